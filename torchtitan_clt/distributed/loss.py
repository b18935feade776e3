"""The loss on a mesh: each rank evaluates it on its rows (dp) and its feature shard (tp).

``build_loss_fn_for_mesh(cfg.loss, parallel_dims, dead_features)`` is what the trainer calls instead of
``build_loss_fn``; in one process it behaves exactly like it. Terms that are means over tokens
need nothing under dp (FSDP averages the ranks' gradients, equal row counts). Per term, under tp:
- ``recon``: from ŷ, already whole and identical on every rank;
- ``sparsity``, ``preact``: sums over features, so each rank holds a partial sum. Its gradient is
  already right (a feature's term depends on that feature only); the logged value is summed
  over tp, and the returned loss gets the missing part as a detached constant, so every rank
  reports the full loss;
- ``auxk``: selects, per token and layer, the k_aux largest dead pre-activations over *all*
  features, and normalizes by the variance of the residual over the *global* batch, so on any
  mesh it is replaced by ``auxk_loss_mesh``: the row threshold comes from the tp ranks' local
  candidates (``global_kth_largest``), the decoder sums its partials like the main one, and the
  normalizer is reduced over dp (each rank returns dp × its share, so the averaged gradient is
  the one-process gradient).

Under ``parallelism.tp_layout = "code"`` (``distributed/tp_code.py``) ŷ is sharded over d_out:
each rank takes the loss on its columns of y, so ``recon`` and AuxK's residual term are partial
sums over tp too (their gradients are right per rank: the decoder's gather sums them at the
selected entries), and AuxK's normalizer is also summed over tp.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchtitan_clt.distributed.collectives import all_reduce_detached, global_kth_largest
from torchtitan_clt.distributed.tensor_parallel import local_params, tp_group_of
from torchtitan_clt.distributed.tp_code import is_code_layout, own_columns
from torchtitan_clt.protocols.transcoder import feature_shard

FEATURE_PARTIAL_TERMS = ("sparsity", "preact")
# Also partial under the code layout, where each rank holds its columns of ŷ and y.
D_OUT_PARTIAL_TERMS = ("recon", "auxk")
# Terms that read the model's parameters (not only the forward's outputs).
PARAM_READING_TERMS = ("preact", "auxk")


def _to_local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def local_output(out):
    """``out`` with its feature-sharded DTensors replaced by this rank's local tensors (an
    unbuilt ``acts`` stays unbuilt: the code goes local instead)."""
    changes = {f.name: _to_local(getattr(out, f.name)) for f in dataclasses.fields(out) if f.name != "code"}
    changes = {k: v for k, v in changes.items() if not isinstance(v, list)}
    return out.replace(**changes, code=None if out.code is None else out.code.local())


def auxk_loss_mesh(
    model, out, y: torch.Tensor, dead: torch.Tensor, k_aux: int, tp_group=None, dp_group=None, d_group=None
) -> torch.Tensor:
    """AuxK (as ``models.losses.auxk_loss``) on this rank's rows and features: ``out`` local,
    ``dead  # [L, F]`` whole. Equal to the one-process value when averaged over dp ranks.
    ``d_group``: ranks holding other columns of ŷ and y (the code layout): the value is then this
    rank's share of the residual term, over the normalizer summed over them."""
    h = out.pre_acts  # [B, L, F/tp]
    B, L, F_loc = h.shape
    dead = dead.to(h.device)
    n_dead = int(dead.sum(-1).max()) if dead.numel() else 0  # same on every rank: dead is whole
    if n_dead == 0 or k_aux <= 0:
        return h.float().sum() * 0.0
    dead_loc = feature_shard(dead, F_loc, tp_group)  # [L, F/tp]
    e = (y.float() - out.y_hat.detach().float()).detach()  # [B, L, d]
    masked = h.detach().float().masked_fill(~dead_loc, float("-inf"))
    thr = global_kth_largest(masked.reshape(B * L, F_loc), min(k_aux, n_dead), tp_group).view(B, L, 1)
    keep = dead_loc & (masked >= thr)
    a_aux = torch.where(keep, torch.relu(h), torch.zeros((), dtype=h.dtype, device=h.device))
    xs = out.xs
    e_hat = model.decode_std_with(a_aux, xs).float()
    zero = torch.zeros_like(h[:1])
    e_hat = e_hat - model.decode_std_with(zero, None if xs is None else xs[:1]).float()
    # Σ‖e − ē‖² over the global batch from the ranks' sums: Σ‖e‖² − ‖Σe‖²/N.
    stats = torch.cat([e.sum(0).reshape(-1), e.pow(2).sum().reshape(1), e.new_tensor([float(B)])])
    dp = 1
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dp = dist.get_world_size(dp_group)
        stats = all_reduce_detached(stats.double(), dp_group).float()
    e_sum, e_sq, n = stats[:-2], stats[-2], stats[-1]
    denom = e_sq - e_sum.pow(2).sum() / n
    if d_group is not None:
        denom = all_reduce_detached(denom.double(), d_group).float()
    denom = denom.clamp_min(1e-12)
    return dp * (e - e_hat).pow(2).sum() / denom


class MeshLossFn:
    """Wraps ``loss_fn(model, out, y, step) -> (loss, terms)`` for a sharded model (see the module
    docstring); a pass-through in one process."""

    def __init__(self, loss_fn, parallel_dims=None, dead_features: Any = None, auxk_k: int = 0):
        self.loss_fn, self.dead_features, self.auxk_k = loss_fn, dead_features, auxk_k
        self.dp_group = parallel_dims.get_group("dp") if parallel_dims is not None else None

    def __getattr__(self, name: str) -> Any:  # expose the wrapped fn's attributes (terms, ...)
        return getattr(self.__dict__["loss_fn"], name)

    def __call__(self, model, out, y, step: int):
        tp_group = tp_group_of(model)
        if tp_group is None and self.dp_group is None:
            return self.loss_fn(model, out, y, step)
        local = local_output(out)
        code = tp_group is not None and is_code_layout(model)
        if code:
            y = own_columns(y, tp_group, model.args.d_out)  # this rank's columns of ŷ (and of y)
        terms_list = getattr(self.loss_fn, "terms", None)
        saved = []
        if terms_list is not None and self.dead_features is not None:
            saved = [(t, t.fn) for t in terms_list if t.name == "auxk"]
            d_group = tp_group if code else None
            for t, _ in saved:
                t.fn = lambda m, o, yy, s: auxk_loss_mesh(
                    m, o, yy, self.dead_features.dead_mask(), self.auxk_k, tp_group, self.dp_group, d_group
                )
        if isinstance(model, FSDPModule) and any(t.name in PARAM_READING_TERMS for t in terms_list or []):
            # These terms read parameters after forward, where FSDP holds only its shards: gather
            # them (FSDP reshards after backward, and gradients reach the gathered copies).
            model.unshard()
        try:
            # Parameters read by the terms (thresholds, the AuxK decoder) are this rank's tp shards.
            with local_params(model):
                loss, terms = self.loss_fn(model, local, y, step)
        finally:
            for t, fn in saved:
                t.fn = fn
        if tp_group is None:
            return loss, terms
        weights = {t.name: t.weight(step) * (t.scale(model) if t.scale else 1.0) for t in terms_list or []}
        missing = torch.zeros((), dtype=loss.dtype, device=loss.device)
        terms = dict(terms)
        for name in FEATURE_PARTIAL_TERMS + (D_OUT_PARTIAL_TERMS if code else ()):
            if name in terms:
                part = terms[name]
                full = all_reduce_detached(part, tp_group)
                terms[name] = full
                missing = missing + weights.get(name, 1.0) * (full - part).to(loss.dtype)
        return loss + missing.detach(), terms


def build_loss_fn_for_mesh(loss_cfg: Any, parallel_dims=None, dead_features: Any = None) -> MeshLossFn:
    """``models.losses.build_loss_fn`` made correct on any mesh (the trainer's entry point);
    ``loss_cfg``: the ``[loss]`` section."""
    from torchtitan_clt.models.losses import build_loss_fn

    inner = build_loss_fn(loss_cfg, dead_features=dead_features)
    return MeshLossFn(inner, parallel_dims, dead_features=dead_features, auxk_k=loss_cfg.auxk_k)
