"""Bookkeeping for the torch fallback: the padded layout ``idx [N, L, K]`` turned once per call
into flat entry lists, by token (for decoding) and by feature (for weight gradients).

Built with a dozen vectorized ops for all layers at once, on one thread (``one_thread``);
everything after it is one ``embedding_bag`` or one sampled matmul per layer, never a
``[entries, D]`` temporary, and no per-layer index arithmetic.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Entries per chunk where a gather-dot is unavoidable (no sampled matmul for the dtype/device).
_CHUNK_ELEMS = 1 << 24


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread. Index bookkeeping (sorts, bincounts, arithmetic over ~1e5
    ids) split over a busy pool waits on its slowest thread at every op, many times slower than
    one thread on a loaded host (benchmarks/results/defaults.md). The big ops (matmuls, gathers)
    keep the pool."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def mark_every_slot(idx: torch.Tensor) -> torch.Tensor:
    """Mark ``idx`` as nearly full (TopK: k slots a row, padding only where a pick is <= 0): its
    torch layout keeps every slot (``Layout.build``), with no host read. Returns ``idx``."""
    idx._every_slot = True
    return idx


@dataclass
class Layout:
    n_tokens: int
    n_features: int
    pos: torch.Tensor  # [E] flat position of each entry in the layer-major [L, N, K] padded layout
    width: int  # K
    n_layers: int
    feats: torch.Tensor  # [E] feature id of each entry, ordered by (layer, token, slot)
    rows: torch.Tensor  # [E] token of each entry
    layer_of: torch.Tensor  # [E] layer of each entry
    layer_start: list[int]  # [L+1] entry range of each layer
    row_offsets: torch.Tensor  # [L, N+1] entry offsets of each token within its layer
    by_feature: torch.Tensor  # [E] permutation sorting entries by (layer, feature), stable
    bag_offsets: torch.Tensor  # [L*F] start of each (layer, feature) bag in by_feature order
    feature_offsets: torch.Tensor  # [L, F+1] the same, relative to the layer's first entry
    rows_by_feature: torch.Tensor  # [E] rows[by_feature]
    table_rows_by_feature: torch.Tensor  # [E] (token * L + layer)[by_feature]: rows of x [N*L, d]
    padding: torch.Tensor | None = None  # [E] bool: padding slots kept as entries (mark_every_slot)

    @classmethod
    def build(cls, idx: torch.Tensor, n_features: int) -> Layout:
        """From ``idx [N, L, K]`` (-1 padding). One ``nonzero`` over the layer-major ids gives every
        entry's flat position; token, layer and slot follow by arithmetic. (Boolean indexing,
        ``repeat_interleave``, ``searchsorted`` and ``masked_select`` over broadcast index grids
        parallelize badly at these sizes on a busy CPU.)

        An ``idx`` marked by ``mark_every_slot`` (TopK: padding only where a pick is <= 0) keeps
        every slot as an entry instead, padding as feature 0 with weight 0: the sizes are then
        known on the host and building the layout reads nothing back from the device."""
        with one_thread(idx.device):
            return cls._build(idx, n_features, getattr(idx, "_every_slot", False))

    @classmethod
    def _build(cls, idx: torch.Tensor, n_features: int, every_slot: bool = False) -> Layout:
        n, n_layers, k = idx.shape
        dev = idx.device
        flat_ids = idx.permute(1, 0, 2).reshape(-1)  # no copy when idx is stored layer-major
        if every_slot:
            pos = torch.arange(flat_ids.numel(), device=dev)
            feats = flat_ids.clamp(min=0)
        else:
            pos = (flat_ids >= 0).nonzero().squeeze(1)  # [E] ascending: (layer, token, slot) order
            feats = flat_ids.index_select(0, pos)
        row = pos // max(k, 1)  # layer * N + token
        rows, layer_of = row % n, row // n
        counts = torch.bincount(row, minlength=n_layers * n).view(n_layers, n)
        row_offsets = torch.zeros((n_layers, n + 1), dtype=torch.long, device=dev)
        row_offsets[:, 1:] = counts.cumsum(1)
        layer_ends = row_offsets[:, -1].cumsum(0)
        layer_start = [j * n * k for j in range(n_layers + 1)] if every_slot else [0, *layer_ends.tolist()]
        key = layer_of * n_features + feats
        if n_layers * n_features < 2**31:  # int32 keys sort faster
            key = key.to(torch.int32)
        by_feature = torch.argsort(key, stable=True)
        bag_counts = torch.bincount(key, minlength=n_layers * n_features)
        bag_offsets = bag_counts.cumsum(0) - bag_counts
        feature_offsets = torch.empty((n_layers, n_features + 1), dtype=torch.long, device=dev)
        feature_offsets[:, :-1] = (
            bag_offsets.view(n_layers, n_features) - (layer_ends - row_offsets[:, -1])[:, None]
        )
        feature_offsets[:, -1] = row_offsets[:, -1]
        return cls(
            n,
            n_features,
            pos,
            k,
            n_layers,
            feats,
            rows,
            layer_of,
            layer_start,
            row_offsets,
            by_feature,
            bag_offsets,
            feature_offsets,
            rows.index_select(0, by_feature),
            (rows * n_layers + layer_of).index_select(0, by_feature),
            padding=(flat_ids < 0) if every_slot else None,
        )

    @classmethod
    def of(cls, idx: torch.Tensor, n_features: int) -> Layout:
        """``build``, cached on the ``idx`` tensor itself: the decoder's forward and the encoder's
        backward of one step read the same selection, so its layout is built once."""
        lay = getattr(idx, "_sparse_layout", None)
        if lay is None or lay.n_features != n_features or lay.n_tokens != idx.shape[0]:
            lay = cls.build(idx, n_features)
            idx._sparse_layout = lay
        return lay

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, L, K]`` -> ``[E]`` in entry order (0 at kept padding)."""
        with one_thread(t.device):
            e = t.permute(1, 0, 2).reshape(-1).index_select(0, self.pos)
            return e if self.padding is None else e.masked_fill(self.padding, 0)

    def unflat(self, e: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """``[E]`` -> ``[N, L, K]`` with zeros at padding."""
        with one_thread(e.device):
            if self.padding is not None:  # every slot is an entry, in slot order
                return e.masked_fill(self.padding, 0).view(self.n_layers, n, k).permute(1, 0, 2)
            out = torch.zeros(self.n_layers * n * k, dtype=e.dtype, device=e.device)
            return out.index_copy_(0, self.pos, e).view(self.n_layers, n, k).permute(1, 0, 2)

    def zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """``[E]`` zeros (the values of a sampled matmul's pattern), made once per dtype."""
        cache = self.__dict__.setdefault("_zeros", {})
        if dtype not in cache:
            with one_thread(self.feats.device):
                cache[dtype] = torch.zeros(self.feats.numel(), dtype=dtype, device=self.feats.device)
        return cache[dtype]

    def by_feature_order(self, e: torch.Tensor) -> torch.Tensor:
        """``[E]`` entry order -> by (layer, feature) order."""
        with one_thread(e.device):
            return e.index_select(0, self.by_feature)

    def from_feature_order(self, e: torch.Tensor) -> torch.Tensor:
        """Inverse of ``by_feature_order``."""
        with one_thread(e.device):
            return torch.empty_like(e).index_copy_(0, self.by_feature, e)

    def span(self, layer: int) -> slice:
        return slice(self.layer_start[layer], self.layer_start[layer + 1])

    def decode(self, layer: int, vals_e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``[N, D]``: token-wise sums ``sum_j vals * w[feat]`` of one layer's entries."""
        sl = self.span(layer)
        if sl.start == sl.stop:
            return torch.zeros((self.n_tokens, w.shape[1]), dtype=w.dtype, device=w.device)
        return F.embedding_bag(
            self.feats[sl],
            w,
            self.row_offsets[layer, :-1],
            mode="sum",
            per_sample_weights=vals_e[sl].to(w.dtype),
        )

    def grad_vals(self, layer: int, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[E_layer]`` in by-feature order (``from_feature_order`` on the concatenation of all
        layers gives entry order): ``w[feat] . g[row]`` for one layer's entries."""
        sl = self.span(layer)
        dt = torch.promote_types(g.dtype, torch.float32)
        if sl.start == sl.stop:
            return torch.zeros(0, dtype=dt, device=g.device)
        rows = self.rows_by_feature[sl]
        if g.device.type == "cpu" and g.dtype == w.dtype and g.dtype in (torch.float32, torch.float64):
            # sampled (w @ g^T) on the by-feature pattern [F, N]: each row of w is read once, for
            # all the tokens that use it (the tokens' rows of g are the small operand)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(
                    self.feature_offsets[layer],
                    rows,
                    self.zeros(g.dtype)[sl],
                    (self.n_features, self.n_tokens),
                    check_invariants=False,
                )
                return torch.sparse.sampled_addmm(pattern, w, g.T, beta=0.0).values().to(dt)
        feats = self.feats.index_select(0, self.by_feature[sl])
        chunk = max(1, (_CHUNK_ELEMS * (4 if g.is_cuda else 1)) // max(w.shape[1], 1))
        return torch.cat(
            [
                (w[feats[c : c + chunk]].float() * g[rows[c : c + chunk]].float()).sum(-1)
                for c in range(0, feats.numel(), chunk)
            ]
        ).to(dt)

    def grad_weight(self, layer: int, vals_bf: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[F, D]``: sum over one layer's entries of ``vals * g[row]`` into row ``feat``: one
        ``embedding_bag`` over ``g`` with one bag per feature (empty bags give the zero rows).
        ``vals_bf``: every layer's values in by-feature order (``by_feature_order``)."""
        sl = self.span(layer)  # g may be a row-strided view (embedding_bag reads it in place)
        if sl.start == sl.stop:
            return torch.zeros((self.n_features, g.shape[1]), dtype=g.dtype, device=g.device)
        return F.embedding_bag(
            self.rows_by_feature[sl],
            g,
            self.feature_offsets[layer, :-1],
            mode="sum",
            per_sample_weights=vals_bf[sl].to(g.dtype),
        )

    def grad_weight_all(self, vals_bf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[L, F, d]`` for every layer in one call: ``x [N, L, d]`` as a table of N*L rows;
        ``vals_bf`` in by-feature order."""
        n_layers = self.n_layers
        x2 = x.contiguous().view(-1, x.shape[-1])  # row n*L + l
        if not self.feats.numel():
            return torch.zeros((n_layers, self.n_features, x.shape[-1]), dtype=x.dtype, device=x.device)
        out = F.embedding_bag(
            self.table_rows_by_feature,
            x2,
            self.bag_offsets,
            mode="sum",
            per_sample_weights=vals_bf.to(x.dtype),
        )
        return out.view(n_layers, self.n_features, -1)
