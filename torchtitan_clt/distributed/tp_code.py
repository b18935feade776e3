"""The ``code`` tensor-parallel layout (``parallelism.tp_layout = "code"``, issue 27): what crosses
ranks is the sparse code, not a dense partial ŷ.

Placements come from the family's ``ModelSpec.tp_code_plan``: the encoder (``W_enc``, ``b_enc``,
JumpReLU thresholds) sharded over features, as in the ``features`` layout; the decoder, the skip
path and ``b_dec`` sharded over ``d_out``. A step on a rank:
1. encoder on its features (every rank reads the whole x), selection against the global threshold
   (``kernels/selection.py``: two small all-gathers);
2. the selected (value, global feature id) entries all-gathered over tp (``gather_code``:
   B·L·k entries of 12 bytes; its backward sums the ranks' gradients at the entries, the B·k values
   the encoder backward needs, and hands each rank its own);
3. every rank decodes *all* active features into its own slice of ŷ ``[B, L, d_out/tp]`` (its
   columns of W_dec, W_skip, b_dec), and the loss is taken on its slice of y; the reconstruction
   term is then a partial sum over tp like the sparsity term (``distributed/loss.py``).
Decoder norms (the sparsity / pre-activation terms) need sums over the whole d_out: the ranks'
squared norms are all-reduced (``[L, F]`` floats), with a summing backward.

Against the ``features`` layout's fp32 all-reduce of ŷ (2·(tp−1)/tp · B·L·d·4 bytes sent per
rank), the code costs (tp−1)/tp · B·L·k·12 (gather) + (tp−1)/tp · B·L·k·4 in backward
(reduce-scatter; gloo, which has none, all-reduces: twice that): at clt_8b (B 4096, L 32,
d 4096, k 64) ~0.12 GiB instead of 3.9 GiB. ``step_bytes`` gives the formula.

Outputs of ``forward_std``: ``pre_acts`` / ``acts`` / ``dec_norms`` feature-sharded DTensors, as in
the ``features`` layout, and ``y_hat`` a DTensor sharded on ``d_out`` (``full_tensor()`` gathers it,
which metrics do on logged steps only). The public ``decode`` / ``forward`` return the whole ŷ.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_clt import kernels
from torchtitan_clt.distributed.tensor_parallel import (
    FeatureShardedOutput,
    LocalShards,
    MethodStyle,
    TPRank,
    _to_local,
    apply_methods,
    local_params,
    shard_parameters,
)
from torchtitan_clt.protocols.transcoder import feature_shard

CODE_LAYOUT = "code"


def _world_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


# The three reads of values that size the gathered code, named so that a traced dry run (whose
# tensors have no values) answers each with its expected size (trainer/dry_run.Expectations).
def _own_entries(flat_idx: torch.Tensor, rows: int, f_local: int, width: int) -> torch.Tensor:
    """Positions of this rank's selected entries in its ``[rows * width]`` layout (``rows`` (token,
    layer) rows over its ``f_local`` features)."""
    return (flat_idx >= 0).nonzero().squeeze(1)


def _pack_size(counts: list[torch.Tensor], own: int) -> int:
    """Entries per rank on the wire: the largest rank's count. ``own`` included explicitly: the
    same in a real run, and the one a traced dry run (whose gathered counts are stand-ins) knows."""
    return max(int(torch.cat(counts).max()), own)


def _entry_count(valid: torch.Tensor, rows: int, f_total: int) -> int:
    """Entries selected over every rank (``rows`` rows of ``f_total`` features)."""
    return int(valid.sum())


def _widest_row(per_row: torch.Tensor, f_total: int) -> int:
    """The widest union row of the gathered code."""
    return int(per_row.max()) if per_row.numel() else 0


class _GatherCode(torch.autograd.Function):
    """``vals, idx [N, L, K_r]`` (ids local to the rank's ``f_local`` features) -> the union over
    tp, ``(vals, idx) [N, L, K]`` with global ids ascending in a row (-1 padding last), K the
    widest union row. On the wire each rank's entries travel as a flat list (value, row, feature
    id; 12 bytes), padded only to the largest rank's count, never to a widest row. Backward: the
    ranks' gradients at the entries summed, each rank keeping its own (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, vals, idx, f_local: int, group):
        world, rank = _world_rank(group)
        n, n_layers, k_r = idx.shape
        flat_idx = idx.reshape(-1)
        mine = _own_entries(flat_idx, n * n_layers, f_local, k_r)  # [nnz_r] positions in [N*L*K_r]
        nnz = torch.tensor([mine.numel()], dtype=torch.int64, device=idx.device)
        counts = [torch.empty_like(nnz) for _ in range(world)]
        dist.all_gather(counts, nnz, group=group)
        m = _pack_size(counts, mine.numel())
        packed = torch.zeros((3, m), dtype=torch.float32, device=idx.device)
        packed[1:].view(torch.int32).fill_(-1)
        packed[0, : mine.numel()] = vals.detach().reshape(-1)[mine].float()
        packed[1, : mine.numel()] = (mine // k_r).to(torch.int32).view(torch.float32)
        feat = (flat_idx[mine] + rank * f_local).to(torch.int32)
        packed[2, : mine.numel()] = feat.view(torch.float32)
        parts = [torch.empty_like(packed) for _ in range(world)]
        if m:  # nothing selected anywhere (e.g. AuxK's all-zero decode): nothing to send
            dist.all_gather(parts, packed, group=group)
        allp = torch.stack(parts, 1).reshape(3, world * m)  # rank-major entries
        all_v = allp[0]
        all_row = allp[1].contiguous().view(torch.int32).long()
        all_feat = allp[2].contiguous().view(torch.int32).long()
        f_total = f_local * world
        valid = all_feat >= 0
        key = torch.where(valid, all_row * f_total + all_feat, n * n_layers * f_total)
        f_rows = n * n_layers
        order = key.argsort()[: _entry_count(valid, f_rows, f_total)]  # entries by (row, feature)
        rows, feats = all_row[order], all_feat[order]
        per_row = torch.bincount(rows, minlength=f_rows)
        width = _widest_row(per_row, f_total)
        pos = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]
        out_idx = torch.full((n * n_layers, width), -1, dtype=torch.int64, device=idx.device)
        out_idx[rows, pos] = feats
        out_vals = torch.zeros((n * n_layers, width), dtype=vals.dtype, device=vals.device)
        out_vals[rows, pos] = all_v[order].to(vals.dtype)
        ctx.save_for_backward(mine, order, rows, pos)
        ctx.meta = (n, n_layers, k_r, world, rank, m, group, vals.dtype)
        out_idx = out_idx.view(n, n_layers, width)
        ctx.mark_non_differentiable(out_idx)
        return out_vals.view(n, n_layers, width), out_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx):
        mine, order, rows, pos = ctx.saved_tensors
        n, n_layers, k_r, world, rank, m, group, dtype = ctx.meta
        full = torch.zeros(world * m, dtype=torch.float32, device=mine.device)
        if g_vals is not None:
            full[order] = g_vals.reshape(n * n_layers, -1)[rows, pos].float()
        full = full.view(world, m)
        if m == 0:
            own = full[rank]
        else:
            own = torch.empty_like(full[0])
            _reduce_scatter(own, full.view(-1), group=group)  # gloo wants dim 0 = W·m
        g = torch.zeros(n * n_layers * k_r, dtype=dtype, device=mine.device)
        g[mine] = own[: mine.numel()].to(dtype)
        return g.view(n, n_layers, k_r), None, None, None


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # torch 2.13 renames reduce_scatter_tensor (and warns on the old name); torch 2.11 has only it.
    # Looked up per call: the watchdog and the collective counters wrap these names.
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def gather_code(
    vals: torch.Tensor, idx: torch.Tensor, f_local: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vals, idx)``: the selected entries of every tp rank (see ``_GatherCode``)."""
    return _GatherCode.apply(vals, idx, f_local, group)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce whose backward all-reduces too: each rank's loss reads only some of the summed
    entries (its own features' norms), and every rank's addend needs the sum of those gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _GatherLastDim(torch.autograd.Function):
    """``[..., d/tp]`` slices -> ``[..., d]`` on every rank; backward: the rank's own slice (every
    rank computes the same thing from the whole tensor)."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = _world_rank(group)
        ctx.rank, ctx.n = rank, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def d_slice(t: torch.Tensor, group) -> torch.Tensor:
    """This rank's columns of a whole ``[..., d_out]`` tensor (``d_out`` split evenly over tp)."""
    world, rank = _world_rank(group)
    n = t.shape[-1] // world
    return t[..., rank * n : (rank + 1) * n]


def own_columns(y: torch.Tensor, group, d_out: int) -> torch.Tensor:
    """This rank's columns of y: sliced when ``y`` has all ``d_out`` of them, else already its own
    (a source delivering columns, ``ActivationSource.deliver_target_columns``)."""
    return d_slice(y, group) if y.shape[-1] == d_out else y


@torch.no_grad()
def whole_columns(y: torch.Tensor, group) -> torch.Tensor:
    """The tp ranks' column slices of the same rows -> whole rows, on every rank (a collective)."""
    world, _ = _world_rank(group)
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class GatheredCode(MethodStyle):
    """``decode_selected(idx, vals, bias)`` with this rank's selected features in: the code
    gathered over tp (``gather_code``), then every rank's features decoded into this rank's
    ``d_out`` slice of ŷ. ``calls`` on the wrapper counts the gathers (the path taken, for tests)."""

    def wrap(self, model, fn, tp):
        @functools.wraps(fn)
        def run(idx: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            run.calls += 1
            vals_g, idx_g = gather_code(vals, idx, model.local_features(), tp.group)
            with local_params(model):
                return fn(idx_g, vals_g, _to_local(bias))

        run.calls = 0
        return run


class CodeDecode(MethodStyle):
    """``decode_std(acts [B, L, F/tp], support=None)`` -> ``[B, L, d_out/tp]``: the active (and
    support) entries compacted, then ``decode_selected`` (which gathers them over tp). Replaces
    the family's dense decoder: on this layout every decode goes through the code."""

    def wrap(self, model, fn, tp):
        @functools.wraps(fn)
        def run(acts: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
            acts = _to_local(acts)
            used = acts != 0 if support is None else (acts != 0) | _to_local(support)
            idx, _ = kernels.compact(used.to(acts.dtype), torch.zeros(acts.shape[1]), "nonzero")
            vals = kernels.dispatch.gather_selected(acts, idx)
            with local_params(model):
                return model.decode_selected(idx, vals, model.b_dec)

        return run


class WholeRowNorms(MethodStyle):
    """The family's ``decoder_norms`` over the whole ``d_out``, for this rank's features: each
    decoder row's squared norm over its local columns (per target for ``sum``, over the whole row
    for ``concat``) all-reduced, then handed to the family's own function as a width-1 row."""

    def wrap(self, model, fn, tp):
        group = tp.group

        @functools.wraps(fn)
        def run(mode: str = "concat") -> torch.Tensor:
            with local_params(model):
                rows = model.decoder_rows()
                keep = {id(W): dims for W, dims in rows}
                swaps, sq = [], []
                for mod in model.modules():
                    for name, p in mod._parameters.items():
                        if p is not None and id(p) in keep:
                            dims = keep[id(p)] if mode == "concat" else (p.dim() - 1,)
                            swaps.append((mod, name, p))
                            sq.append(p.float().pow(2).sum(dims, keepdim=True))
                flat = _SumOverGroup.apply(torch.cat([s.reshape(-1) for s in sq]), group)
                off = 0
                try:
                    for (mod, name, _p), s in zip(swaps, sq):
                        full = flat[off : off + s.numel()].view(s.shape)
                        off += s.numel()
                        pos = full > 0  # a zero row has norm 0 and gradient 0 (as vector_norm's)
                        mod._parameters[name] = torch.where(pos, full, 1.0).sqrt() * pos
                    norms = fn(mode)  # [L, F]
                finally:
                    for mod, name, p in swaps:
                        mod._parameters[name] = p
            return feature_shard(norms, model.local_features(), group)

        return run


@contextlib.contextmanager
def local_out_buffers(model: nn.Module, group) -> Iterator[None]:
    """Within the block ``out_mean`` / ``out_scale`` read as this rank's ``d_out`` columns, so the
    public ``decode`` unstandardizes its slice of ŷ and the trainer (un)standardizes its columns
    of y and ŷ."""
    saved = {name: model._buffers[name] for name in ("out_mean", "out_scale")}
    for name, b in saved.items():
        model._buffers[name] = d_slice(b, group)
    try:
        yield
    finally:
        model._buffers.update(saved)


class GatheredColumns(MethodStyle):
    """The public ``decode``: this rank's slice of the raw ŷ (its columns of the output
    standardization too), then the slices gathered: the whole ŷ on every rank."""

    def wrap(self, model, fn, tp):
        @functools.wraps(fn)
        def run(acts: torch.Tensor, x: torch.Tensor | None = None, *, features_only: bool = False):
            with local_params(model), local_out_buffers(model, tp.group):
                y = fn(_to_local(acts), x, features_only=features_only)
            return _GatherLastDim.apply(y, tp.group)

        return run


# The code layout: the encoder side as in the features layout, the decoder through the code.
CODE_METHODS: dict[str, MethodStyle] = {
    "forward_std": FeatureShardedOutput(y_hat_dim=-1),  # y_hat: this rank's d_out columns
    "encode": FeatureShardedOutput(),
    "pre_acts": LocalShards(),
    "decode_selected": GatheredCode(),
    "decode_std": CodeDecode(),
    "decoder_norms": WholeRowNorms(),
    "decode": GatheredColumns(),
}


def apply_tp_code(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    plan: dict[str, int | None],
    methods: dict[str, MethodStyle] | None = None,
) -> nn.Module:
    """Shard ``model`` per the family's ``tp_code_plan`` and its methods per ``CODE_METHODS``
    updated with ``methods`` (``ModelSpec.tp_methods``): the decoder routed through the code
    (module docstring). Works on a meta-device model (before ``to_empty`` / ``init_weights``)."""
    if not hasattr(model, "decode_selected"):
        raise ValueError(
            f"{type(model).__name__} has no sparse decoder (decode_selected): parallelism.tp_layout = "
            '"code" needs one; use parallelism.tp_layout = "features".'
        )
    shard_parameters(model, tp_mesh, plan)
    apply_methods(model, {**CODE_METHODS, **(methods or {})}, TPRank(tp_mesh, plan))
    model._tp_group = tp_mesh.get_group()  # read by MeshLossFn
    model._tp_layout = CODE_LAYOUT
    return model


def is_code_layout(model: nn.Module) -> bool:
    return getattr(model, "_tp_layout", None) == CODE_LAYOUT


def step_bytes(
    batch: int, n_layers: int, d_out: int, k_per_row: float, tp: int, bytes_y: int = 4
) -> dict[str, float]:
    """Bytes each rank sends per step over tp for the decoder's exchange, ring algorithms:
    ``features``: the fp32 all-reduce of ŷ; ``code``: the all-gather of (value, row, id) entries
    forward and the reduce-scatter of their gradient backward, assuming the
    ranks hold equal shares of the entries. ``k_per_row``: mean selected entries per token and
    layer (k; BatchTopK over layers: k too, on average)."""
    f = (tp - 1) / tp
    entries = batch * n_layers * k_per_row
    return {
        "features": 2 * f * batch * n_layers * d_out * bytes_y,
        "code": f * entries * 12 + f * entries * 4,
    }
