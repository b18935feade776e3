"""Bookkeeping for the torch fallback: the padded layout ``idx [N, L, K]`` turned once per call
into flat entry lists, by token (for decoding) and by feature (for weight gradients).

Built with a dozen vectorized ops for all layers at once; everything after it is one
``embedding_bag`` or one sampled matmul per layer, never a ``[entries, D]`` temporary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Entries per chunk where a gather-dot is unavoidable (no sampled matmul for the dtype/device).
_CHUNK_ELEMS = 1 << 24


@dataclass
class Layout:
    n_tokens: int
    n_features: int
    valid: torch.Tensor  # [L, N, K] bool: entry present (layer-major view of idx >= 0)
    feats: torch.Tensor  # [E] feature id of each entry, ordered by (layer, token, slot)
    rows: torch.Tensor  # [E] token of each entry
    layer_of: torch.Tensor  # [E] layer of each entry
    layer_start: list[int]  # [L+1] entry range of each layer
    row_offsets: torch.Tensor  # [L, N+1] entry offsets of each token within its layer
    by_feature: torch.Tensor  # [E] permutation sorting entries by (layer, feature), stable
    bag_offsets: torch.Tensor  # [L*F] start of each (layer, feature) bag in by_feature order

    @classmethod
    def build(cls, idx: torch.Tensor, n_features: int) -> Layout:
        # masked_select / bincount rather than boolean indexing / repeat_interleave / searchsorted:
        # same result, and far cheaper on a busy CPU (those parallelize badly at these sizes)
        n, n_layers, k = idx.shape
        dev = idx.device
        idx_l = idx.permute(1, 0, 2)  # [L, N, K]
        valid = idx_l >= 0
        feats = torch.masked_select(idx_l, valid)
        rows = torch.masked_select(torch.arange(n, device=dev)[None, :, None].expand(n_layers, n, k), valid)
        layer_of = torch.masked_select(
            torch.arange(n_layers, device=dev)[:, None, None].expand(n_layers, n, k), valid
        )
        counts = valid.sum(-1)  # [L, N]
        row_offsets = torch.zeros((n_layers, n + 1), dtype=torch.long, device=dev)
        row_offsets[:, 1:] = counts.cumsum(1)
        layer_start = [0, *row_offsets[:, -1].cumsum(0).tolist()]
        key = layer_of * n_features + feats
        if n_layers * n_features < 2**31:  # int32 keys sort about twice as fast
            key = key.to(torch.int32)
        by_feature = torch.argsort(key, stable=True)
        bag_counts = torch.bincount(key, minlength=n_layers * n_features)
        bag_offsets = bag_counts.cumsum(0) - bag_counts
        return cls(
            n, n_features, valid, feats, rows, layer_of, layer_start, row_offsets, by_feature, bag_offsets
        )

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, L, K]`` -> ``[E]`` in entry order."""
        return torch.masked_select(t.permute(1, 0, 2), self.valid)

    def unflat(self, e: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """``[E]`` -> ``[N, L, K]`` with zeros at padding."""
        out = torch.zeros((self.valid.shape[0], n, k), dtype=e.dtype, device=e.device)
        return out.masked_scatter_(self.valid, e).permute(1, 0, 2)

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
        """``[E_layer]``: ``w[feat] . g[row]`` for one layer's entries (a sampled matmul)."""
        sl = self.span(layer)
        feats, rows = self.feats[sl], self.rows[sl]
        if feats.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=g.device)
        if g.device.type == "cpu" and g.dtype == w.dtype and g.dtype in (torch.float32, torch.float64):
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(
                    self.row_offsets[layer],
                    feats,
                    torch.zeros(feats.numel(), dtype=g.dtype),
                    (self.n_tokens, w.shape[0]),
                    check_invariants=False,
                )
                return torch.sparse.sampled_addmm(pattern, g, w.T, beta=0.0).values().float()
        chunk = max(1, (_CHUNK_ELEMS * (4 if g.is_cuda else 1)) // max(w.shape[1], 1))
        return torch.cat(
            [
                (w[feats[c : c + chunk]].float() * g[rows[c : c + chunk]].float()).sum(-1)
                for c in range(0, feats.numel(), chunk)
            ]
        )

    def grad_weight(self, layer: int, vals_e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[F, D]``: sum over one layer's entries of ``vals * g[row]`` into row ``feat``: one
        ``embedding_bag`` over ``g`` with one bag per feature (empty bags give the zero rows)."""
        sl = self.span(layer)  # g may be a row-strided view (embedding_bag reads it in place)
        if sl.start == sl.stop:
            return torch.zeros((self.n_features, g.shape[1]), dtype=g.dtype, device=g.device)
        order = self.by_feature[sl]  # layer-major sort: this layer's entries sit in its own span
        f0 = layer * self.n_features
        offsets = self.bag_offsets[f0 : f0 + self.n_features] - sl.start
        return F.embedding_bag(
            self.rows.index_select(0, order),
            g,
            offsets,
            mode="sum",
            per_sample_weights=vals_e.index_select(0, order).to(g.dtype),
        )

    def grad_weight_all(self, vals_e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[L, F, d]`` for every layer in one call: ``x [N, L, d]`` as a table of N*L rows."""
        n_layers = self.valid.shape[0]
        x2 = x.contiguous().view(-1, x.shape[-1])  # row n*L + l
        if not self.feats.numel():
            return torch.zeros((n_layers, self.n_features, x.shape[-1]), dtype=x.dtype, device=x.device)
        table_rows = (self.rows * n_layers + self.layer_of).index_select(0, self.by_feature)
        out = F.embedding_bag(
            table_rows,
            x2,
            self.bag_offsets,
            mode="sum",
            per_sample_weights=vals_e.index_select(0, self.by_feature).to(x.dtype),
        )
        return out.view(n_layers, self.n_features, -1)
