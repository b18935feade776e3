"""The held-out evaluation run from the sharded model: no rank gathers the dictionary (issue 26).

Every rank of the mesh runs the evaluator on the same held-out tokens through its own copy of the
LLM. At the splice hooks a dictionary layer runs on this rank's tensor-parallel shard, and the
collectives of its tp group give every rank the same full-width replacement output, so the LLM's
forward and every metric (CE, KL, FVU, feature statistics) are the same on every rank; rank 0 logs
them. Data-parallel replicas compute the same thing (no sums to reduce over dp, no extra code path:
the evaluation is a small part of a run).

What a rank holds: its tp shard of every parameter in the parameters' dtype (FSDP2's data-parallel
chunks all-gathered, ``tp_shards``: the tp shard is what a training forward unshards too), plus
one layer's chunk of activations. Per layer ``i`` and token chunk (``ShardedLayerOps``):
- encode: the rank's features from the whole x (every rank reads it), the activation on them:
  JumpReLU / ReLU / eval-mode BatchTopK elementwise (local); TopK per token and layer through the
  training selection over the tp group (``kernels.selection.select``: the global top k, ties to the
  lowest feature id, as in one process);
- ``features`` layout (decoder sharded over features): this rank's features decode a partial write,
  the skip path its slice of d_in, into a running partial sum per replaced target;
- ``code`` layout (``distributed/tp_code.py``: decoder sharded over d_out): the layer's active
  entries all-gathered as the sparse code (value, id), this rank's d_out columns decoded from every
  feature into its columns of each target.
Only when the LLM reads a target is it made whole (``finish``: one fp32 all-reduce of ``[n, d]``,
or one all-gather of the columns) and the bias path added: a CLT source writes to every later
layer, so reducing per source would move L/2 times more. The result is the plain model's up to
fp32 summation order. Families: those whose per-layer pieces ``metrics/splice.py`` runs
(``_LayerOps``: CLT, Matryoshka CLT, PLT, SAE; tested: CLT and PLT); others (MOLT, a user's
family) are gathered as before (``supported``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchtitan_clt.distributed.tensor_parallel import tp_group_of
from torchtitan_clt.distributed.tp_code import is_code_layout
from torchtitan_clt.metrics.feature_stats import DEFAULT_DENSE_THRESHOLD, FeatureStatsAccumulator
from torchtitan_clt.metrics.splice import _LayerOps
from torchtitan_clt.metrics.training import fvu_sums
from torchtitan_clt.models.activations import TopK, _to_dense
from torchtitan_clt.models.common import is_dtensor

try:
    from torch.distributed.tensor import Replicate
except ImportError:  # pragma: no cover - torch built without distributed
    Replicate = None  # type: ignore[assignment,misc]


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile`` wrapper (metrics does not import checkpoint)."""
    return getattr(model, "_orig_mod", model)


def supported(model: nn.Module) -> bool:
    """Whether ``model`` is sharded over a mesh and its family has the per-layer pieces the sharded
    evaluation runs (module docstring); if not, the trainer gathers a plain copy instead."""
    sharded = any(is_dtensor(p) for p in unwrap(model).parameters())
    if not (dist.is_available() and dist.is_initialized() and sharded):
        return False
    ops = _LayerOps(unwrap(model))
    return ops.clt or ops.plt


def _tp_shard(p: torch.Tensor, tp: bool) -> torch.Tensor:
    """This rank's tp shard of parameter ``p`` as a plain tensor. FSDP2 chunks the tp-local tensor
    on dim 0 over its shard mesh dim (``torch.chunk`` sizes): those chunks are all-gathered here, as
    FSDP's own unshard does but in the parameter's dtype (no mixed-precision cast), and never
    through the whole parameter (``DTensor.redistribute`` replicates a leading mesh dim by way of
    the full tensor)."""
    if not is_dtensor(p):
        return p.detach()
    mesh, places = p.device_mesh, list(p.placements)
    tp_dim = mesh.ndim - 1 if tp else None  # FSDP2's mesh is (dp..., tp): tp last
    rows = p.shape[0]
    if tp_dim is not None and getattr(places[tp_dim], "dim", None) == 0:
        rows //= mesh.size(tp_dim)  # tp shards dim 0 too (a CLT decoder's features)
    local = p.to_local().detach()
    sharded = [i for i, pl in enumerate(places) if i != tp_dim and not isinstance(pl, Replicate)]
    if len(sharded) > 1 or any(getattr(places[i], "dim", None) != 0 for i in sharded):
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} is placed {places} over {mesh}: the sharded "
            "evaluation knows tensor parallelism on the last mesh dim and FSDP's dim-0 shards; "
            "set eval.enable=false (and eval.every=0) for this mesh, or report the layout."
        )
    if sharded:
        group, world = mesh.get_group(sharded[0]), mesh.size(sharded[0])
        chunk = -(-rows // world)
        pad = local.new_zeros(chunk, *local.shape[1:])
        pad[: local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        local = torch.cat(parts)[:rows]
    return local


@contextlib.contextmanager
def tp_shards(model: nn.Module) -> Iterator[ShardedLayerOps]:
    """Within the block every parameter of ``model`` reads as this rank's tp shard (a plain
    tensor, FSDP's dp shards gathered; the sharded ones come back on exit) and the block gets the
    ``ShardedLayerOps`` that run a dictionary layer on them. Collective: every rank enters."""
    tc = unwrap(model)
    group = tp_group_of(tc)
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for mod in tc.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    swapped.append((mod, name, p))
                    mod._parameters[name] = _tp_shard(p, group is not None)
        yield ShardedLayerOps(tc, group, "code" if is_code_layout(tc) else "features")
    finally:
        for mod, name, p in reversed(swapped):
            mod._parameters[name] = p


class ShardedLayerOps(_LayerOps):
    """``_LayerOps`` on this rank's tp shards plus the tp group's collectives (module docstring).

    The parameters must read as the local shards (``tp_shards``). ``encode`` gives this rank's
    features of a layer; ``clt_write`` / ``plt_output`` this rank's part of the output
    (``width`` columns), which ``finish`` makes whole, identical on every rank of the group, and
    ``base`` adds the bias to. ``observe(i, acts)`` (optional) sees each encoded chunk's local
    activations (the feature statistics count them)."""

    sharded = True

    def __init__(self, tc: nn.Module, group: Any, layout: str):
        super().__init__(tc)
        if not (self.clt or self.plt):
            raise ValueError(
                f"{type(tc).__name__}: the sharded evaluation runs the built-in per-layer pieces "
                "(CLT, PLT, SAE); check metrics.sharded_eval.supported first."
            )
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.code = layout == "code" and self.world > 1
        a = tc.args
        self.d_in, self.d_out = a.d_in, a.d_out
        self.f_local = tc.W_enc.shape[1]
        self.observe = None
        if self.code:  # this rank's d_out columns of the output standardization
            n = a.d_out // self.world
            self.cols = slice(self.rank * n, (self.rank + 1) * n)
        else:
            self.cols = slice(None)

    # --- collectives over the tp group ------------------------------------------------------
    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().contiguous()
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def _cat(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The group's pieces of ``t`` along ``dim``, in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    # --- one layer ----------------------------------------------------------------------------
    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x  # [c, d_in] raw, whole -> this rank's features of layer i  # [c, F/tp]."""
        tc = self.tc
        xs = (x - tc.in_mean[i]) / tc.in_scale[i]
        h = xs.to(tc.W_enc.dtype) @ tc.W_enc[i].t() + tc.b_enc[i]  # [c, F/tp]
        H = h.new_zeros(h.shape[0], tc.args.n_layers, h.shape[1])
        H[:, i] = h
        act = tc.activation
        if isinstance(act, TopK):  # the global top k of the row, over the group's shards
            from torchtitan_clt.kernels.selection import select

            idx, _ = select(H, act.selection(), group=self.group if self.world > 1 else None)
            a = _to_dense(H, idx)[:, i]
        else:  # elementwise on this rank's features (thresholds local, BatchTopK's per layer)
            a = act(H)[:, i]
        if self.observe is not None:
            self.observe(i, a)
        return a

    def _skip_partial(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of layer i's skip path, standardized output units  # [c, d_out or
        d_out/tp]: ``features``: its slice of d_in times its rows (summed with the features);
        ``code``: all of x times its columns. A replicated ``W_skip``: the whole path on rank 0."""
        W = getattr(self.tc, "W_skip", None)
        if W is None:
            return None
        xs = (x - self.tc.in_mean[i]) / self.tc.in_scale[i]
        if not self.code and W.shape[1] != self.d_in:
            n = W.shape[1]
            xs = xs[:, self.rank * n : (self.rank + 1) * n]
        y = (xs.to(W.dtype) @ W[i]).float()
        if not self.code and W.shape[1] == self.d_in and self.rank != 0:
            y = torch.zeros_like(y)
        return y

    def _features(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What this rank's decoder reads  # [c, F/tp] or [c, F]: its own features (``features``),
        or (``code``) every rank's, moved as the sparse code (``tp_code.gather_code``: value and id
        of the active entries) and laid out dense for the family's decoder."""
        a = self.encode(i, x)
        if not self.code:
            return a
        from torchtitan_clt import kernels
        from torchtitan_clt.distributed.tp_code import gather_code

        a3 = a[:, None]  # [c, 1, F/tp]
        idx, _ = kernels.compact(a3, torch.zeros(1), "nonzero")
        vals = kernels.dispatch.gather_selected(a3, idx)
        vals, idx = gather_code(vals, idx, self.f_local, self.group)  # global ids, -1 padded
        full = a.new_zeros(a.shape[0], self.f_local * self.world)
        keep = idx[:, 0] >= 0
        # Added, not written: the padding (-1, sent to feature 0) adds zeros to a real entry.
        return full.scatter_add_(1, idx[:, 0].clamp(min=0), torch.where(keep, vals[:, 0], 0.0))

    @property
    def width(self) -> int:
        """Columns of the output this rank accumulates: all of d_out (``features``: a partial
        sum over its features) or its own d_out/tp (``code``)."""
        return self.d_out // self.world if self.code else self.d_out

    def clt_write(self, i: int, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        """This rank's part of source i's write to targets i..L-1  # [c, L−i, width], raw units,
        no bias (``finish`` makes it whole); with ``skip``, layer i's skip path at offset 0."""
        tc = self.tc
        w = tc._decode_source(i, self._features(i, x)).float()
        s = self._skip_partial(i, x) if skip else None
        if s is not None:
            w[:, 0] += s
        return w * tc.out_scale[i:, self.cols]

    def plt_output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of layer i's output  # [c, width], raw units, no bias (``base``)."""
        tc = self.tc
        a = self._features(i, x).to(tc.W_dec.dtype)
        y = (a @ tc.W_dec[i]).float()
        s = self._skip_partial(i, x)
        if s is not None:
            y = y + s
        return y * tc.out_scale[i, self.cols]

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """A target's accumulated part  # [n, width] -> the whole output without bias  # [n, d_out]:
        one reduction per target read (never per source: a source writes to every later layer)."""
        return self._cat(y, -1) if self.code else self._sum(y.clone())

    def base(self) -> torch.Tensor:
        """The bias path, what every target gets with no feature active  # [L, d_out] raw."""
        tc = self.tc
        b = self._cat(tc.b_dec.float(), -1) if self.code else tc.b_dec.float()
        return b * tc.out_scale + tc.out_mean

    # --- feature statistics ---------------------------------------------------------------------
    def decoder_norms(self) -> list[torch.Tensor] | None:
        """Per source s the raw-unit norm of each feature's write to each later target  # [F, L−s]
        float64 (CLT-shaped models; None otherwise), the same on every rank."""
        if not self.clt:
            return None
        tc, out = self.tc, []
        for s, W in enumerate(tc.W_dec):
            w = W.float() * tc.out_scale[s:, self.cols][None]  # [F or F/tp, L−s, d_out or d_out/tp]
            if self.code:
                out.append(self._sum(w.pow(2).sum(2)).double().sqrt())
            else:
                out.append(self._cat(torch.linalg.vector_norm(w, dim=2), 0).double())
        return [n.cpu() for n in out]


class ShardedFeatureStats(FeatureStatsAccumulator):
    """``FeatureStatsAccumulator`` of the sharded model (inside ``tp_shards``): ŷ is the
    replacement's whole output (``_Writes`` over every layer), each feature counted on the rank that
    owns it and the counts gathered in ``compute``; every rank gets the same statistics."""

    def __init__(
        self, transcoder: nn.Module, ops: ShardedLayerOps, dense_threshold: float = DEFAULT_DENSE_THRESHOLD
    ):
        super().__init__(transcoder, dense_threshold)
        self.ops = ops

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x  # [N, L, d_in], y  # [N, L, d_out] raw units (the same on every rank)."""
        from torchtitan_clt.metrics.splice import DEFAULT_CHUNK_ELEMENTS, _Writes

        L = self.L
        fired = torch.zeros(L, self.ops.f_local, dtype=torch.float64)

        def observe(i: int, a: torch.Tensor) -> None:
            fired[i] += (a != 0).sum(0).double().cpu()

        # Rows in blocks: ŷ and the partial sums stay [rows, L, d_out] (one chunk's worth).
        rows = max(1, DEFAULT_CHUNK_ELEMENTS // (L * max(self.ops.d_in, self.ops.d_out)))
        was_training = self.tc.training
        self.tc.eval()  # BatchTopK: its inference threshold (training mode would also move its EMA)
        self.ops.observe = observe
        try:
            for r in range(0, x.shape[0], rows):
                state = _Writes(self.tc, list(range(L)), DEFAULT_CHUNK_ELEMENTS, ops=self.ops)
                xr = x[r : r + rows].to(state.device, torch.float32)
                yr = y[r : r + rows].to(state.device, torch.float32)
                for i in range(L):
                    state.read(i, xr[:, i])
                y_hat = torch.stack([state.output(t) for t in range(L)], 1)  # [rows, L, d_out]
                s = fvu_sums(yr, y_hat)
                self.sums = s if self.sums is None else self.sums + s
        finally:
            self.ops.observe = None
            self.tc.train(was_training)
        self.fired = fired if self.fired is None else self.fired + fired  # this rank's features
        self.tokens += x.shape[0]

    def compute(self) -> dict[str, Any]:
        if self.fired is None:
            raise ValueError("ShardedFeatureStats: no batches were added.")
        local = self.fired
        self.fired = self.ops._cat(local.to(self.ops.tc.in_mean.device), 1).cpu()  # [L, F]
        self.active = self.fired.sum(1)  # Σ over tokens of the active features, per layer
        try:
            return super().compute()
        finally:
            self.fired = local

    def _decoder_norms(self) -> dict[str, Any] | None:
        from torchtitan_clt.metrics.feature_stats import summarize_decoder_norms

        norms = self.ops.decoder_norms()
        return None if norms is None else summarize_decoder_norms(norms)
