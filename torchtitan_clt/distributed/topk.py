"""TopK and BatchTopK when the pre-activations are split over ranks.

Under tensor parallelism a rank holds the features ``F/tp`` of every token; under data
parallelism it holds ``B/dp`` of the tokens. BatchTopK selects over the whole global batch and
every feature (the one-process result), so its threshold is the k·B-th (scope ``layer``, per
layer) or k·B·L-th (scope ``all``) largest pre-activation over *all* ranks; TopK selects over the
features of one token, so only the tp group takes part. ``global_kth_largest`` finds the exact
threshold from each rank's local candidates; then every rank keeps its values >= threshold.

These subclass the single-device modules and keep their buffers (same state-dict keys); in eval
mode BatchTopK is JumpReLU with the tracked threshold, which needs no communication.
"""

from __future__ import annotations

import torch

from torchtitan_clt.distributed.collectives import global_kth_largest
from torchtitan_clt.models.activations import BatchTopK, TopK


def _keep_at_least(h: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """relu(h) where h >= thr (broadcast), else 0; gradients reach the kept values only."""
    return torch.where(h >= thr, torch.relu(h), torch.zeros((), dtype=h.dtype, device=h.device))


def _min_positive_kept(h: torch.Tensor, thr: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    inf = torch.tensor(float("inf"), dtype=h.dtype, device=h.device)
    return torch.where((h >= thr) & (h > 0), h, inf).amin(dim=dims)


class DistBatchTopK(BatchTopK):
    """BatchTopK over the global batch and all features; ``group`` spans every rank that holds a
    different part of [B, L, F] (dp × tp), ``batch_scale`` = dp degree (global B = local B × dp)."""

    def setup(self, group, batch_scale: int, tp_group=None) -> DistBatchTopK:
        self.group, self.batch_scale = group, batch_scale
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(h)
        B, L, F = h.shape  # local batch, all layers, local features
        B_global = B * self.batch_scale
        hd = h.detach().float()
        if self.scope == "layer":
            flat = hd.transpose(0, 1).reshape(L, B * F)  # [L, B*F_local]
            thr = global_kth_largest(flat, self.k * B_global, self.group)  # [L]
            thr_b = thr.to(h.dtype)[None, :, None]  # [1, L, 1]
            min_pos = _min_positive_kept(hd, thr_b.float(), (0, 2))  # [L] local
        else:
            flat = hd.reshape(1, -1)
            thr = global_kth_largest(flat, self.k * B_global * L, self.group)  # [1]
            thr_b = thr.to(h.dtype).reshape(1, 1, 1)
            min_pos = _min_positive_kept(hd, thr_b.float(), (0, 1, 2)).expand(L)
        min_pos = _all_min(min_pos, self.group)
        self._observe(min_pos)
        return _keep_at_least(h, thr_b)


class DistTopK(TopK):
    """TopK per token and layer over features split across ``tp_group``; the inference threshold
    (smallest kept value per layer) is taken over the global batch (``group``, all ranks)."""

    def setup(self, group, batch_scale: int = 1, tp_group=None) -> DistTopK:
        self.group, self.tp_group = group, tp_group
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, F = h.shape
        hd = h.detach().float()
        thr = global_kth_largest(hd.reshape(B * L, F), self.k, self.tp_group).view(B, L, 1)
        if self.training:
            min_pos = _all_min(_min_positive_kept(hd, thr, (0, 2)), self.group)
            self._observe(min_pos)
        return _keep_at_least(h, thr.to(h.dtype))


def _all_min(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group)
    return x


_DIST_VERSIONS = {BatchTopK: DistBatchTopK, TopK: DistTopK}


def distribute_activation(module: torch.nn.Module, group, batch_scale: int, tp_group) -> torch.nn.Module:
    """Turn a TopK / BatchTopK module into its distributed twin in place (same buffers and keys);
    elementwise activations (ReLU, JumpReLU) are returned unchanged."""
    for base, dist_cls in _DIST_VERSIONS.items():
        if type(module) is base:
            module.__class__ = dist_cls
            return module.setup(group, batch_scale, tp_group)
    return module


def needs_distribution(module: torch.nn.Module) -> bool:
    return type(module) in _DIST_VERSIONS
