"""Tensor (feature) parallelism for transcoders, applied from outside the model.

Features are sharded over the tp mesh: every parameter with a feature axis (encoder rows, encoder
bias, thresholds, decoder rows) becomes a ``DTensor`` sharded on that axis, the skip path
``W_skip`` on ``d_in`` (a rank's slice of x adds its part into the same sum as its features), and
the output bias ``b_dec`` is replicated. Parameters stay DTensors, so FSDP2 composes with them and the
distributed checkpoint holds whole tensors whatever the mesh.

The model code is written for one device and runs unchanged on each rank's *local* shards. The
plan is declared in two tables: the family's parameter placements (``ModelSpec.tp_plan``: which
axis of each parameter is sharded) and the layout's method styles (``FEATURES_METHODS``: for each
method, where its output lies on the mesh, as TorchTitan's ``ParallelStyle`` does for a module;
a family adds its own with ``ModelSpec.tp_methods``). Every style runs the method with each
DTensor parameter replaced by its local tensor (``to_local``, whose backward routes the gradient
into the DTensor); ``PartialSumOutput`` (``decode_std``) then sums the rank's partial ŷ over tp
(identity backward: every rank holds the same ŷ and computes the same loss) and adds the bias once.

What callers get back:
- ``forward_std``: ``y_hat`` whole and identical on every tp rank (a plain tensor); ``pre_acts`` /
  ``acts`` ``[B, L, F]`` and ``dec_norms`` ``[L, F]`` as DTensors sharded on the feature axis, so
  metrics reduce them with DTensor ops (``(acts != 0).sum(-1)`` is a partial sum, ``full_tensor()``
  gathers) and nothing dense is gathered unless asked for.
- The loss runs on the local shards (``distributed/loss.py``, ``MeshLossFn``).
- ``encode`` returns a feature-sharded DTensor; ``decode`` takes one (or this rank's local shard).

A family whose feature axis is a run of segments with separate decoder tensors (MOLT: one ``U`` /
``V`` per group of transforms, ``model.feature_segments()``) shards each segment's tensors on
their own, while the encoder's rows stay one contiguous block per rank. ``SegmentExchange``
moves the gates from the block to this rank's segment shares before the decoder (and the decoder
norms back), with one all-to-all of this rank's share each way: the selection, the losses and the
metrics see the same contiguous layout as for any other family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from torchtitan_clt.distributed.collectives import sum_partials
from torchtitan_clt.protocols.transcoder import TranscoderOutput


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, name = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), name


def placement_for(fqn: str, plan: dict[str, int | None]) -> int | None:
    """Shard dim of parameter ``fqn`` from ``plan`` (regex -> dim, ``None`` = replicate)."""
    for pattern, dim in plan.items():
        if re.fullmatch(pattern, fqn):
            return dim
    raise ValueError(
        f"tensor-parallel plan has no entry for parameter {fqn!r}; add it to the family's "
        "parallelize plan (a feature axis to shard, or None to replicate)."
    )


@contextlib.contextmanager
def local_params(model: nn.Module) -> Iterator[None]:
    """Within the block, every DTensor parameter of ``model`` reads as its local tensor."""
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if isinstance(p, DTensor):
                swapped.append((mod, name, p))
                # A view with a grad_fn into the DTensor parameter: the gradient flows back to it.
                mod._parameters[name] = p.to_local()
    try:
        yield
    finally:
        for mod, name, p in reversed(swapped):
            mod._parameters[name] = p


def _to_local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded(t, mesh: DeviceMesh, dim: int):
    """A local feature shard as a DTensor (no communication); ``None`` stays ``None``."""
    if t is None or isinstance(t, DTensor):
        return t
    return DTensor.from_local(t, mesh, [Shard(dim)], run_check=False)


def sharded_output(out: TranscoderOutput, tp_mesh: DeviceMesh, **changes: Any) -> TranscoderOutput:
    """``forward_std``'s local output with its feature axes as ``Shard`` DTensors (no
    communication); the sparse code stays pairs, marked with the mesh."""
    acts = out.dense_acts  # None on the sparse step: left unbuilt
    return out.replace(
        pre_acts=_sharded(out.pre_acts, tp_mesh, out.pre_acts.dim() - 1),
        dense_acts=None if acts is None else _sharded(acts, tp_mesh, acts.dim() - 1),
        code=None if out.code is None else dataclasses.replace(out.code, mesh=tp_mesh),
        dec_norms=_sharded(out.dec_norms, tp_mesh, 1),
        **changes,
    )


# ---- the plan of a model's methods -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TPRank:
    """What a method style needs to know about this rank's place in the tp mesh."""

    mesh: DeviceMesh
    plan: dict[str, int | None]  # the family's parameter placements (``ModelSpec.tp_plan``)
    bias_name: str = "b_dec"  # the output bias, added once after the ranks' partials are summed
    segments: tuple[SegmentExchange, SegmentExchange] | None = None  # (block -> shares, back)

    @property
    def group(self):
        return self.mesh.get_group()


class MethodStyle:
    """How one method of a transcoder runs on a tp rank: where its inputs and outputs lie on the
    mesh, as TorchTitan's ``ParallelStyle`` says it for a module. Every style runs the family's
    single-device method on this rank's local shards (``local_params``); what differs is what
    it does with the output (a ``Shard`` DTensor, a partial sum summed over tp, ...).

    A layout is a table ``method name -> style`` (``FEATURES_METHODS``, ``tp_code.CODE_METHODS``)
    that ``apply_methods`` applies; a family adds or replaces entries for its own methods with
    ``ModelSpec.tp_methods``."""

    def wrap(self, model: nn.Module, fn: Callable, tp: TPRank) -> Callable:
        raise NotImplementedError


class LocalShards(MethodStyle):
    """Inputs and output as they are: the method reads this rank's shards (an inner method
    called directly, or one whose output is whole on every rank, as ``decode``'s is)."""

    def wrap(self, model, fn, tp):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with local_params(model):
                return fn(*args, **kwargs)

        return run


class FeatureShardedOutput(MethodStyle):
    """The output's feature axis (last) is this rank's shard: returned as a ``Shard`` DTensor
    (``encode``); a ``TranscoderOutput`` gets every feature axis marked (``sharded_output``) and,
    with ``y_hat_dim``, ``y_hat`` sharded on that axis too (the code layout's ``d_out`` slice)."""

    def __init__(self, y_hat_dim: int | None = None):
        self.y_hat_dim = y_hat_dim

    def wrap(self, model, fn, tp):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with local_params(model):
                out = fn(*args, **kwargs)
            if not isinstance(out, TranscoderOutput):
                return _sharded(out, tp.mesh, out.dim() - 1)
            changes = {}
            if self.y_hat_dim is not None:
                changes["y_hat"] = _sharded(out.y_hat, tp.mesh, self.y_hat_dim % out.y_hat.dim())
            return sharded_output(out, tp.mesh, **changes)

        return run


class PartialSumOutput(MethodStyle):
    """The method decodes this rank's features: its output is a partial sum over tp. Run with a
    zero output bias, summed over the group in fp32 (identity backward: every rank then holds the
    same ŷ and computes the same loss), the bias added once. A family with feature segments gets
    its features (and ``used`` / ``support`` masks) moved to its segment shares first."""

    def wrap(self, model, fn, tp):
        if tp.segments is not None:
            fn = _to_segment_shares(fn, tp.segments[0])

        @functools.wraps(fn)
        def run(acts: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            acts = _to_local(acts)
            args = tuple(_to_local(a) for a in args)
            kwargs = {k: _to_local(v) for k, v in kwargs.items()}
            with local_params(model):
                mod, name = _owner(model, tp.bias_name)
                bias = mod._parameters[name]
                mod._parameters[name] = torch.zeros_like(bias).detach()
                try:
                    y = fn(acts, *args, **kwargs)
                finally:
                    mod._parameters[name] = bias
                # Summed in fp32: tp partials in bf16 (FSDP mixed precision) would lose precision.
                y = sum_partials(y.float() if y.dtype in (torch.bfloat16, torch.float16) else y, tp.group)
                return y + bias.to(y.dtype)

        return run


class SkipShares(MethodStyle):
    """The skip path as the sum over tp of each rank's share (``skip_partial``): with ``W_skip``
    sharded on ``d_in`` (dim 1), the rank's slice of the input times its rows; replicated, all of
    it on tp rank 0 and zeros elsewhere. A model without a skip path runs it locally."""

    def wrap(self, model, fn, tp):
        if getattr(model, "W_skip", None) is None or not hasattr(model, "skip_partial"):
            return LocalShards().wrap(model, fn, tp)
        dim, d_in = placement_for("W_skip", tp.plan), model.W_skip.shape[1]
        rank, world = tp.mesh.get_local_rank(), tp.mesh.size()
        if dim not in (1, None):
            raise ValueError(
                f"the tensor-parallel plan shards W_skip on dim {dim}; it takes 1 (d_in) or None"
            )

        @functools.wraps(fn)
        def partial(xs: torch.Tensor) -> torch.Tensor | None:
            with local_params(model):
                if dim is None:
                    y = fn(xs)
                    return y if rank == 0 or y is None else torch.zeros_like(y)
                n = d_in // world
                return fn(xs[..., rank * n : (rank + 1) * n])

        model.skip_partial = partial
        return functools.wraps(fn)(lambda xs: sum_partials(partial(xs), tp.group))


class FeatureBlockNorms(MethodStyle):
    """``decoder_norms`` for this rank's features, in the encoder's block order: a family with
    feature segments computes them on its segment shares, moved back to the block."""

    def wrap(self, model, fn, tp):
        if tp.segments is None:
            return LocalShards().wrap(model, fn, tp)
        back = tp.segments[1]

        @functools.wraps(fn)
        def run(*args, **kwargs) -> torch.Tensor:
            with local_params(model):
                return back(fn(*args, **kwargs))

        return run


# The features layout. forward_std / encode / decode / forward are the entry points; the inner
# methods are listed too so that a direct call also works (the swap is re-entrant).
FEATURES_METHODS: dict[str, MethodStyle] = {
    "forward_std": FeatureShardedOutput(),
    "encode": FeatureShardedOutput(),
    "decode": LocalShards(),
    "forward": LocalShards(),
    "pre_acts": LocalShards(),
    "decoder_norms": FeatureBlockNorms(),
    "decode_std": PartialSumOutput(),
    "skip_std": SkipShares(),
}


def apply_methods(model: nn.Module, methods: dict[str, MethodStyle], tp: TPRank) -> None:
    """Every method ``methods`` names, replaced on ``model`` by its style's wrapper of the
    family's own (class) method."""
    for name, style in methods.items():
        fn = getattr(model, name, None)
        if fn is None:
            raise ValueError(
                f"the tensor-parallel method plan names {name!r}, which {type(model).__name__} does not "
                "have; remove it from ModelSpec.tp_methods (or define the method)."
            )
        setattr(model, name, style.wrap(model, fn, tp))


def _all_to_all_last(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """All-to-all along the last axis: ``send[q]`` entries (in order) to rank q, ``recv[p]`` from p."""
    flat = x.movedim(-1, 0).contiguous()
    out = flat.new_empty((sum(recv), *flat.shape[1:]))
    dist.all_to_all_single(out, flat, recv, send, group=group)
    return out.movedim(0, -1)


class _Exchange(torch.autograd.Function):
    """``x[..., send_order]`` sent out, received entries put in ``recv_order``; backward the reverse."""

    @staticmethod
    def forward(ctx, x, plan: SegmentExchange):
        ctx.plan = plan
        return plan.move(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.plan.inverse().move(g.contiguous()), None


@dataclasses.dataclass(frozen=True)
class SegmentExchange:
    """Moves the last (feature) axis of a tensor from one layout of the global features over the
    tp ranks to another (``between``), exactly (entries are moved, never summed)."""

    send_order: torch.Tensor  # local positions, grouped by destination rank
    send: list[int]  # entries to each rank
    recv: list[int]  # entries from each rank
    recv_order: torch.Tensor  # output position j takes received entry recv_order[j]
    group: Any

    @classmethod
    def between(cls, src: list[torch.Tensor], dst: list[torch.Tensor], rank: int, group) -> SegmentExchange:
        """``src[r]`` / ``dst[r]``: the global feature ids rank r holds, in its local order."""
        n = int(sum(len(i) for i in src))
        owner, owner_src = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        for r, ids in enumerate(dst):
            owner[ids] = r
        for r, ids in enumerate(src):
            owner_src[ids] = r
        dest = owner[src[rank]]
        send_order = torch.sort(dest, stable=True).indices
        send = torch.bincount(dest, minlength=len(dst)).tolist()
        recv = torch.bincount(owner_src[dst[rank]], minlength=len(src)).tolist()
        # What arrives: from each rank in turn, its entries for this rank in its local order.
        got = torch.cat([ids[owner[ids] == rank] for ids in src])
        where = torch.empty(n, dtype=torch.long)
        where[got] = torch.arange(len(got))
        return cls(send_order, send, recv, where[dst[rank]], group)

    def inverse(self) -> SegmentExchange:
        back = torch.empty_like(self.recv_order)
        back[self.recv_order] = torch.arange(len(back))
        undo = torch.empty_like(self.send_order)
        undo[self.send_order] = torch.arange(len(undo))
        return SegmentExchange(back, self.recv, self.send, undo, self.group)

    def move(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        out = _all_to_all_last(x.index_select(-1, self.send_order.to(dev)), self.send, self.recv, self.group)
        return out.index_select(-1, self.recv_order.to(dev))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bool:  # masks: no gradient, and the collectives take no bool
            return self.move(x.to(torch.uint8)).bool()
        return _Exchange.apply(x, self)


def segment_exchanges(
    segments: list[int], rank: int, world: int, group
) -> tuple[SegmentExchange, SegmentExchange]:
    """(block -> segment shares, segment shares -> block) for a feature axis made of ``segments``
    (counts, each divisible by ``world``): rank r's block is features [r·N/W, (r+1)·N/W), its
    segment shares the r-th slice of every segment, in segment order."""
    N = sum(segments)
    blocks = [torch.arange(r * N // world, (r + 1) * N // world) for r in range(world)]
    starts = [sum(segments[:i]) for i in range(len(segments))]
    shares = [
        torch.cat(
            [torch.arange(o + r * n // world, o + (r + 1) * n // world) for o, n in zip(starts, segments)]
        )
        for r in range(world)
    ]
    there = SegmentExchange.between(blocks, shares, rank, group)
    return there, SegmentExchange.between(shares, blocks, rank, group)


def _segmented(model: nn.Module, tp_mesh: DeviceMesh) -> tuple[SegmentExchange, SegmentExchange]:
    """The exchanges of a model with ``feature_segments()``, checking every segment splits evenly."""
    segments, world = list(model.feature_segments()), tp_mesh.size()
    if any(n % world for n in segments):
        raise ValueError(
            f"{type(model).__name__}: its feature segments {segments} (model.molt_counts) must each "
            f"be divisible by parallelism.tp = {world}; pick counts that are multiples of {world}."
        )
    return segment_exchanges(segments, tp_mesh.get_local_rank(), world, tp_mesh.get_group())


def _to_segment_shares(fn, there: SegmentExchange):
    """The features of ``acts`` and of a ``used`` / ``support`` mask moved to the segment shares."""

    @functools.wraps(fn)
    def run(acts: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for key in ("used", "support"):
            if kwargs.get(key) is not None:
                kwargs[key] = there(_to_local(kwargs[key]))
        return fn(there(_to_local(acts)), *args, **kwargs)

    return run


def shard_parameters(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, int | None]) -> None:
    """Every parameter of ``model`` becomes a DTensor over ``tp_mesh``, sharded on the dim
    ``plan`` gives it (``placement_for``) or replicated."""
    for fqn, p in list(model.named_parameters()):
        dim = placement_for(fqn, plan)
        if dim is not None and p.shape[dim] % tp_mesh.size() != 0:
            what = "model.features_per_layer" if fqn != "W_skip" else "d_in (or model.skip_connection=false)"
            if fqn.split(".")[0] in ("W_dec", "b_dec", "W_skip") and dim == p.dim() - 1:  # code layout
                what = 'the output width d_out (or parallelism.tp_layout = "features")'
            raise ValueError(
                f"{fqn} has {p.shape[dim]} rows on dim {dim}, not divisible by tp = {tp_mesh.size()}; "
                f"pick parallelism.tp dividing {what}."
            )
        placements = [Shard(dim)] if dim is not None else [Replicate()]
        mod, name = _owner(model, fqn)
        dt = distribute_tensor(p.data, tp_mesh, placements)
        mod.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    plan: dict[str, int | None],
    bias_name: str = "b_dec",
    methods: dict[str, MethodStyle] | None = None,
) -> nn.Module:
    """Shard ``model``'s parameters over ``tp_mesh`` per ``plan`` and its methods per
    ``FEATURES_METHODS`` updated with ``methods`` (the family's ``ModelSpec.tp_methods``); see
    the module doc. Works on a meta-device model (before ``to_empty`` / ``init_weights``)."""
    # Checked first: a segment that does not split is the setting to name (not its tensors' rows).
    segmented = _segmented(model, tp_mesh) if hasattr(model, "feature_segments") else None
    shard_parameters(model, tp_mesh, plan)
    apply_methods(model, {**FEATURES_METHODS, **(methods or {})}, TPRank(tp_mesh, plan, bias_name, segmented))
    model._tp_group = tp_mesh.get_group()  # read by MeshLossFn
    return model


def tp_group_of(model: nn.Module):
    """The tp process group ``apply_tp`` used, or ``None`` when the model is not tensor-parallel."""
    return getattr(model, "_tp_group", None)
