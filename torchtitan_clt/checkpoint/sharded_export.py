"""A sharded model's weights one source layer at a time, gathered and folded, for the exports.

A model trained on a mesh has DTensor parameters: tensor parallelism shards the feature axis,
FSDP2 dim 0 (for a layer-stacked tensor, the layer axis). Gathering it whole onto rank 0
(clt_8b: 75.7 B parameters, ~303 GB) is what the exports must not do. ``LayerStream`` instead
gathers source layer j on every rank, collectively: row j of every layer-stacked tensor (``W_enc``,
``b_enc``, ``b_dec``, ``W_skip``, the activation's state, the standardization buffers) and, for a
crosslayer family, the whole ``W_dec.{j}  # [F, L-j, d]``; it folds the standardization into that
layer and hands it over, and the previous layer is dropped. So no rank holds more than its own
shard plus one source layer (``tests/unit/test_sharded_export_mesh.py`` measures it).

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
def gather_whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t`` on the CPU (collective for a DTensor: every rank calls it)."""
    return (t.full_tensor() if is_dtensor(t) else t).detach().to("cpu")


def gather_row(t: torch.Tensor, j: int) -> torch.Tensor:
    """Row ``j`` (dim 0) of the tensor behind ``t`` on the CPU, without gathering the other rows
    (collective for a DTensor). A mesh dimension that shards dim 0 (FSDP) broadcasts the row from
    the rank that holds it; one that shards another dim (tp) all-gathers the row's slices."""
    if not is_dtensor(t):
        return t.detach()[j].to("cpu")
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, local = t.device_mesh, t.to_local()
    coord = mesh.get_coordinate()
    row_placements, piece = [], None
    for i, p in enumerate(t.placements):
        if type(p) is Replicate:
            row_placements.append(Replicate())
        elif type(p) is Shard and p.dim % t.dim() != 0:
            row_placements.append(Shard(p.dim % t.dim() - 1))
        elif type(p) is Shard and piece is None:
            n = mesh.size(i)
            chunk = -(-t.shape[0] // n)
            owner = j // chunk
            at = list(coord)
            at[i] = owner
            src = int(mesh.mesh[tuple(at)])
            if coord[i] == owner:
                piece = local[j - owner * chunk].contiguous()
            else:
                piece = torch.empty(local.shape[1:], dtype=local.dtype, device=local.device)
            dist.broadcast(piece, src=src, group=mesh.get_group(i))
            row_placements.append(Replicate())
        else:  # e.g. FSDP2 over tp on the same dim (_StridedShard): gather it whole
            return gather_whole(t)[j].clone()
    if piece is None:
        piece = local[j]
    if all(type(p) is Replicate for p in row_placements):
        return piece.detach().to("cpu")
    shape = tuple(t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    row = DTensor.from_local(piece, mesh, row_placements, run_check=False, shape=shape, stride=stride)
    return row.full_tensor().detach().to("cpu")


# --- one source layer, folded -----------------------------------------------------------------------
def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


@torch.no_grad()
def fold_layer(w: dict[str, torch.Tensor], std: dict[str, torch.Tensor], j: int, plan: LayerPlan) -> None:
    """Fold the standardization into source layer ``j``'s fp32 tensors ``w`` (in place of the
    dict's values; the tensors themselves are not written to): ``LayerwiseTranscoder.fold_standardization``
    and the family's ``_fold_into_weights``, row j. ``std``: the four buffers, whole [L, d]."""
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
        w[f"W_dec.{j}"] = w[f"W_dec.{j}"] * sig_o[j:][None]
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
            fold_layer(w, self.std, j, self.plan)
            self.j, self.w = j, w
        return self.w

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
