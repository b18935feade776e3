"""Standardization statistics estimated from the first tokens of a run.

The trainer estimates them once before step 1 and stores them in the model's buffers, so they
travel with every checkpoint and are folded into the weights at export.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StatsAccumulator:
    """Per-layer, per-dimension running sums in float64 (exact enough for any token count)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None  # [L, d]
        self.sumsq: torch.Tensor | None = None  # [L, d]

    def update(self, a: torch.Tensor) -> None:  # a [B, L, d]
        a64 = a.detach().to(torch.float64)
        s, ss = a64.sum(0), (a64 * a64).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.n += a.shape[0]

    def all_reduce(self, group: dist.ProcessGroup | None) -> None:
        if group is None or not dist.is_initialized() or self.sum is None:
            return
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
        for t in (self.sum, self.sumsq, n):
            dist.all_reduce(t, group=group)
        self.n = int(n.item())

    def mean_scale(self, mode: str, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale) of shape [L, d] for ``mode`` in none / scalar / per_dim."""
        assert self.sum is not None and self.sumsq is not None and self.n > 0
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean * mean).clamp_min(0)
        if mode == "none":
            return torch.zeros_like(mean), torch.ones_like(mean)
        if mode == "per_dim":
            return mean, var.sqrt().clamp_min(eps)
        if mode == "scalar":
            # One scale per layer: the centered vectors get unit mean squared norm per dimension.
            scale = var.mean(-1, keepdim=True).sqrt().clamp_min(eps).expand_as(mean)
            return mean, scale.contiguous()
        raise ValueError(f"unknown standardization mode {mode!r}")


class Standardization(tuple):
    """(in_mean, in_scale, out_mean, out_scale), each [L, d]: what ``set_standardization`` takes.
    ``target_mean  # [L, d_out]`` is the raw target mean whatever the mode (for ``b_dec`` init)."""

    target_mean: torch.Tensor


def estimate_standardization(
    next_batch, n_tokens: int, batch_size: int, mode_in: str, mode_out: str, group=None
) -> Standardization:
    """Read ``n_tokens`` rows through ``next_batch(batch_size) -> (x, y)``; return
    (in_mean, in_scale, out_mean, out_scale), each [L, d] float32 on the batches' device."""
    acc_x, acc_y = StatsAccumulator(), StatsAccumulator()
    seen = 0
    while seen < n_tokens:
        x, y = next_batch(min(batch_size, n_tokens - seen))
        acc_x.update(x)
        acc_y.update(y)
        seen += x.shape[0]
    acc_x.all_reduce(group)
    acc_y.all_reduce(group)
    in_mean, in_scale = acc_x.mean_scale(mode_in)
    out_mean, out_scale = acc_y.mean_scale(mode_out)
    stats = Standardization(t.float() for t in (in_mean, in_scale, out_mean, out_scale))
    stats.target_mean = acc_y.mean_scale("per_dim")[0].float()
    return stats


def resolve_b_dec_init(model_cfg) -> str:
    """``model.b_dec_init`` with ``auto`` resolved: ``mean`` for an SAE, ``zero`` otherwise."""
    choice = model_cfg.b_dec_init
    if choice == "auto":
        return "mean" if model_cfg.name == "sae" else "zero"
    return choice


@torch.no_grad()
def init_b_dec_from_mean(model, target_mean: torch.Tensor) -> None:
    """Set the output bias to the target mean (raw ``target_mean  # [L, d_out]``), in the model's
    standardized units: 0 when the targets are centered, the mean itself when they are not."""
    from torchtitan_clt.models.common import copy_full_

    b = model.standardize_out(target_mean.to(model.out_mean.device).float())
    copy_full_(model.b_dec, b.detach().cpu())
