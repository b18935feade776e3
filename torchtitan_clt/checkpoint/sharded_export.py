"""A sharded model's weights one source layer at a time, gathered and folded, for the exports.

A model trained on a mesh has DTensor parameters: tensor parallelism shards the feature axis,
FSDP2 dim 0 (for a layer-stacked tensor, the layer axis). Gathering it whole onto rank 0
(clt_8b: 75.7 B parameters, ~303 GB) is what the exports must not do. ``LayerStream`` instead
gathers source layer j onto rank 0's CPU, collectively: row j of every layer-stacked tensor
(``W_enc``, ``b_enc``, ``b_dec``, ``W_skip``, the activation's state, the standardization buffers)
and, for a crosslayer family, the whole ``W_dec.{j}  # [F, L-j, d]``, each rank sending its pieces
of it in turn (so a device holds one rank's piece at a time); it folds the standardization into
that layer and hands it over, and the previous layer is dropped. The other ranks receive nothing
(meta tensors of the same shapes). So rank 0 holds its own shard plus one source layer, the others
their shards (``tests/unit/test_sharded_export_mesh.py`` measures it).

Families: those whose fold is the layerwise one (``LayerwiseTranscoder`` with the CLT's or the
PLT's decoder fold: clt, matryoshka_clt, plt, sae); for others (molt, a user's family)
``layer_plan`` is None and the exporters gather a whole copy as before. The per-layer fold is
``fold_standardization``'s arithmetic row by row; its two sums over d_in (b_enc − (W_enc/σ)·μ, and
b_dec − μ·(W_skip/σ) with a skip path) run per layer where the family runs them batched over
layers, and BLAS may round those in the last bit differently when the input mean is not zero.
Every other value is elementwise, so it is the gathered export's, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.checkpoint.plain import unwrap
from torchtitan_clt.models.clt.model import CrossLayerTranscoder
from torchtitan_clt.models.common import LayerwiseTranscoder, is_dtensor
from torchtitan_clt.models.plt.model import PerLayerTranscoder
from torchtitan_clt.protocols.registry import activation_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

STANDARDIZATION = ("in_mean", "in_scale", "out_mean", "out_scale")


@dataclass(frozen=True)
class LayerPlan:
    """Which state-dict entries make up source layer j."""

    n_layers: int
    stacked: tuple[str, ...]
    """Entries with the layer on dim 0: layer j owns row j."""
    per_source: tuple[str, ...]
    """``W_dec.{j}`` of a crosslayer family (layer j owns the whole tensor); empty otherwise."""


def is_sharded(model: torch.nn.Module) -> bool:
    return any(is_dtensor(p) for p in unwrap(model).parameters())


def layer_plan(model: torch.nn.Module) -> LayerPlan | None:
    """The per-source-layer split of ``model``'s state, or None when its family folds its
    standardization in a way this module does not know (module docstring)."""
    m = unwrap(model)
    cls = type(m)
    if not isinstance(m, LayerwiseTranscoder) or (
        cls.fold_standardization is not LayerwiseTranscoder.fold_standardization
        or cls._fold_encoder is not LayerwiseTranscoder._fold_encoder
    ):
        return None
    L = m.args.n_layers
    if cls._fold_into_weights is CrossLayerTranscoder._fold_into_weights:
        per_source = tuple(f"W_dec.{s}" for s in range(L))
    elif cls._fold_into_weights is PerLayerTranscoder._fold_into_weights:
        per_source = ()
    else:
        return None
    sd = m.state_dict()
    stacked = tuple(k for k in sd if k not in per_source)
    if any(sd[k].dim() == 0 or sd[k].shape[0] != L for k in stacked):
        return None
    return LayerPlan(L, stacked, per_source)


# --- gathering ------------------------------------------------------------------------------------
# Only rank 0 writes and fits, so only rank 0 receives: the other ranks send their pieces and get a
# meta tensor of the same shape (no memory), which the fold runs on as it does on rank 0's.
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _received(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def gather_whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t`` on rank 0's CPU, a meta tensor elsewhere (collective for a
    DTensor: every rank calls it)."""
    if not is_dtensor(t):  # replicated: rank 0 has it
        return t.detach().to("cpu") if _rank() == 0 else _received(tuple(t.shape), t.dtype)
    return _to_rank0(t, None)


def gather_row(t: torch.Tensor, j: int) -> torch.Tensor:
    """Row ``j`` (dim 0) of the tensor behind ``t`` on rank 0's CPU, a meta tensor elsewhere,
    without gathering the other rows (collective for a DTensor)."""
    if not is_dtensor(t):  # replicated: rank 0 has it
        return t.detach()[j].to("cpu") if _rank() == 0 else _received(tuple(t.shape[1:]), t.dtype)
    return _to_rank0(t, j)


def _to_rank0(t: torch.Tensor, j: int | None) -> torch.Tensor:
    """``t`` whole (``j`` None) or its row j, sent to rank 0 piece by piece: for every block of
    the sharded dims, the rank that holds it (the row's owner on a mesh dim sharding dim 0, rank
    0's coordinate on replicated dims) sends it, so rank 0's device holds one rank's piece at a
    time. Placements other than plain Shard / Replicate (FSDP2 over tp on one dim: _StridedShard)
    are gathered with ``full_tensor`` on every device instead."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, local, shape = t.device_mesh, t.to_local(), tuple(t.shape)
    out_shape = shape if j is None else shape[1:]
    dims = [(i, p.dim % t.dim()) for i, p in enumerate(t.placements) if type(p) is not Replicate]
    plain = all(type(t.placements[i]) is Shard for i, _ in dims) and len({d for _, d in dims}) == len(dims)
    if not plain:
        full = t.full_tensor()
        full = full if j is None else full[j]
        return full.detach().to("cpu").clone() if _rank() == 0 else _received(out_shape, t.dtype)
    me, coord = _rank(), mesh.get_coordinate()
    r0 = [int(c) for c in (mesh.mesh == 0).nonzero()[0]]
    out = torch.empty(out_shape, dtype=t.dtype) if me == 0 else _received(out_shape, t.dtype)

    def blocks(k: int):  # (mesh coordinate, box) of every block; k: the next sharded dim
        if k == len(dims):
            yield list(r0), [(0, n) for n in shape]
            return
        i, d = dims[k]
        n = mesh.size(i)
        chunk = -(-shape[d] // n)
        for c in range(n):
            lo, hi = min(c * chunk, shape[d]), min((c + 1) * chunk, shape[d])
            if hi == lo or (j is not None and d == 0 and not lo <= j < hi):
                continue
            for at, box in blocks(k + 1):
                at[i], box[d] = c, (lo, hi)
                yield at, box

    for at, box in blocks(0):
        src = int(mesh.mesh[tuple(at)])
        if j is not None:
            box[0] = (j, j + 1)
        if me == src:  # my block: its slice of my local shard
            mine = tuple(slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(box, _my_box(t, coord)))
            piece = local[mine].contiguous()
            if me == 0:
                out[_out_index(box, j)] = piece.detach().to("cpu").reshape(out[_out_index(box, j)].shape)
            else:
                dist.send(piece, dst=0)
        elif me == 0:
            piece = torch.empty([hi - lo for lo, hi in box], dtype=local.dtype, device=local.device)
            dist.recv(piece, src=src)
            out[_out_index(box, j)] = piece.to("cpu").reshape(out[_out_index(box, j)].shape)
    return out


def _my_box(t: torch.Tensor, coord: list[int]) -> list[tuple[int, int]]:
    """This rank's block of the full tensor, ``[(lo, hi)]`` per dim (plain Shard / Replicate)."""
    from torch.distributed.tensor import Shard

    box = [(0, n) for n in t.shape]
    for i, p in enumerate(t.placements):
        if type(p) is Shard:
            d = p.dim % t.dim()
            chunk = -(-t.shape[d] // t.device_mesh.size(i))
            lo = min(coord[i] * chunk, t.shape[d])
            box[d] = (lo, min(lo + chunk, t.shape[d]))
    return box


def _out_index(box: list[tuple[int, int]], j: int | None) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in (box if j is None else box[1:]))


# --- one source layer, folded -----------------------------------------------------------------------
def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


@torch.no_grad()
def fold_layer(
    w: dict[str, torch.Tensor],
    std: dict[str, torch.Tensor],
    j: int,
    plan: LayerPlan,
    inplace: frozenset[str] = frozenset(),
) -> None:
    """Fold the standardization into source layer ``j``'s fp32 tensors ``w`` (in place of the
    dict's values; the tensors themselves are not written to): ``LayerwiseTranscoder.fold_standardization``
    and the family's ``_fold_into_weights``, row j. ``std``: the four buffers, whole [L, d].
    ``inplace``: names whose tensors are fresh copies that may be scaled where they are."""
    mu, sig, mu_o, sig_o = (std[k].float() for k in STANDARDIZATION)
    b_dec = w["b_dec"]
    if "W_skip" in w:
        S = w["W_skip"] / sig[j][:, None]
        b_dec = b_dec - torch.einsum("ld,lde->le", mu[j][None], S[None])[0]
        w["W_skip"] = S * sig_o[j][None, :]
    W = w["W_enc"] / sig[j][None, :]
    w["b_enc"] = w["b_enc"] - torch.einsum("lfd,ld->lf", W[None], mu[j][None])[0]
    w["W_enc"] = W
    if plan.per_source:  # W_dec.{j} [F, L-j, d] writes targets j..L-1
        name = f"W_dec.{j}"
        if name in inplace:  # rank 0's own gathered copy: at clt_8b W_dec.0 alone is 16 GiB
            w[name] = w[name].mul_(sig_o[j:][None])
        else:
            w[name] = w[name] * sig_o[j:][None]
    else:  # W_dec [L, F, d], row j
        w["W_dec"] = w["W_dec"] * sig_o[j][None, :]
    w["b_dec"] = b_dec * sig_o[j] + mu_o[j]
    for k in STANDARDIZATION:  # identity once folded
        w[k] = torch.zeros_like(w[k]) if k.endswith("mean") else torch.ones_like(w[k])


class LayerStream:
    """Source layers of a (sharded) model, gathered and folded one at a time (collective: every
    rank asks for the same layers in the same order). Holds the last layer asked for only."""

    def __init__(self, model: torch.nn.Module, plan: LayerPlan | None = None):
        self.model = unwrap(model)
        self.plan = plan or layer_plan(self.model)
        if self.plan is None:
            raise ValueError(f"{type(self.model).__name__}: no per-layer fold known; export a gathered copy.")
        self.state = self.model.state_dict()
        self.std = {k: self.state[k].detach().to("cpu") for k in STANDARDIZATION}  # replicated buffers
        self.j: int | None = None
        self.w: dict[str, torch.Tensor] = {}

    @property
    def n_layers(self) -> int:
        return self.plan.n_layers

    def layer(self, j: int) -> dict[str, torch.Tensor]:
        """Source layer j, fp32 (other dtypes as stored), standardization folded: row j of every
        stacked entry under its own name, and ``W_dec.{j}`` whole for a crosslayer family."""
        if self.j != j:
            self.w = {}  # drop the previous layer before gathering the next
            w = self.raw_layer(j)
            if not any(v.is_meta for v in w.values()):  # rank 0 (the others hold shapes only)
                fold_layer(w, self.std, j, self.plan, self._fresh(w))
            self.j, self.w = j, w
        return self.w

    def _fresh(self, w: dict[str, torch.Tensor]) -> frozenset[str]:
        """The entries of ``w`` that share no storage with the model (gathered copies)."""
        mine = set()
        for v in self.state.values():
            local = v.to_local() if is_dtensor(v) else v
            mine.add(id(local.untyped_storage()))
        return frozenset(k for k, v in w.items() if id(v.untyped_storage()) not in mine)

    def raw_layer(self, j: int) -> dict[str, torch.Tensor]:
        """Source layer j as trained (standardized units, not folded, not kept): the entries of
        ``layer``, fp32."""
        self.w, self.j = {}, None
        w = {k: _f32(gather_row(self.state[k], j)) for k in self.plan.stacked}
        if self.plan.per_source:
            w[self.plan.per_source[j]] = _f32(gather_whole(self.state[self.plan.per_source[j]]))
        return w

    def encoder(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j's encoder as trained, ``W_enc[j]  # [F, d_in]`` and ``b_enc[j]  # [F]``, fp32
        (gathered, not kept: the calibration passes read only these)."""
        self.w, self.j = {}, None
        return _f32(gather_row(self.state["W_enc"], j)), _f32(gather_row(self.state["b_enc"], j))

    def pre_acts(self, x: torch.Tensor, j: int, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Layer j's pre-activations  # [n, F] of raw rows ``x  # [n, L, d_in]`` (the family's
        ``pre_acts(standardize_in(x))``, layer j, as one batch of the same batched matmul)."""
        xs = (x[:, j].float() - self.std["in_mean"][j]) / self.std["in_scale"][j]
        return torch.bmm(xs[None], W.transpose(0, 1)[None])[0] + b

    def release(self) -> None:
        self.j, self.w = None, {}

    def layer_tensors(self, _model: Any, j: int) -> dict[str, torch.Tensor | None]:
        """Layer j as ``protocols.model_spec.layerwise_tensors`` gives it (the exporters' form)."""
        w = self.layer(j)
        W_dec = w[self.plan.per_source[j]] if self.plan.per_source else w["W_dec"]
        return {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": W_dec, "b_dec": w["b_dec"],
                "W_skip": w.get("W_skip")}  # fmt: skip

    def feature_thresholds(self, j: int) -> torch.Tensor:
        """θ_j  # [F]: the activation's ``feature_thresholds()`` row j, from a one-layer copy of
        the activation holding layer j's state (so any activation's own formula applies)."""
        args = TranscoderArgs.from_dict({**self.model.args.to_dict(), "n_layers": 1})
        act = activation_registry.get(args.activation)(args)
        w = self.layer(j)
        prefix = "activation."
        act.load_state_dict({k[len(prefix) :]: w[k][None] for k in w if k.startswith(prefix)})
        return act.feature_thresholds()[0].detach().float()


def layer_bytes(model: torch.nn.Module, plan: LayerPlan, j: int) -> int:
    """Bytes of source layer j as stored (the bound the tests hold the export to)."""
    sd = unwrap(model).state_dict()
    n = sum(math.prod(sd[k].shape[1:]) * sd[k].element_size() for k in plan.stacked)
    if plan.per_source:
        t = sd[plan.per_source[j]]
        n += math.prod(t.shape) * t.element_size()
    return n
