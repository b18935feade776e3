"""Training metrics in raw units: FVU and L0 per layer, and the dead-feature tracker.

FVU_l = Σ‖y_l − ŷ_l‖² / Σ‖y_l − ȳ_l‖², sums over tokens and dimensions, ȳ_l the mean over the
tokens (per dimension). It is not a mean of per-batch ratios: ``FVUAccumulator`` keeps the sums
(float64) so the FVU over many batches and data-parallel ranks is the FVU of their union.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful


def _full(t: torch.Tensor) -> torch.Tensor:
    # A DTensor (e.g. activations sharded over features by TP) becomes the whole tensor.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _as_tokens(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., L, D] -> [N, L, D]; a DTensor stays one (reductions over it are gathered after)."""
    if t.dim() < 2:
        raise ValueError(f"{name} must be [..., n_layers, dim], got shape {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-2], t.shape[-1])


@dataclass
class FVUSums:
    """Sums that FVU is made of; adding two of them is the FVU of the union of their batches."""

    sse: torch.Tensor  # [L] Σ‖y − ŷ‖²
    sum: torch.Tensor  # [L, d] Σ y
    sumsq: torch.Tensor  # [L] Σ‖y‖²
    count: torch.Tensor  # [] tokens

    def __add__(self, other: FVUSums) -> FVUSums:
        return FVUSums(
            self.sse + other.sse, self.sum + other.sum, self.sumsq + other.sumsq, self.count + other.count
        )

    def fvu(self) -> torch.Tensor:
        """[L] FVU (float64); NaN for a layer whose target never varied."""
        n = self.count.clamp_min(1)
        var = self.sumsq - (self.sum * self.sum).sum(-1) / n  # [L] Σ‖y − ȳ‖²
        var = var.clamp_min(0)
        return torch.where(var > 0, self.sse / var, torch.full_like(var, float("nan")))


@torch.no_grad()
def fvu_sums(y: torch.Tensor, y_hat: torch.Tensor) -> FVUSums:
    """Sums of one batch (float64). y, y_hat: [..., n_layers, d] raw units."""
    y = _as_tokens(_full(y), "y")
    y_hat = _as_tokens(_full(y_hat), "y_hat").to(y.dtype)
    if y.shape != y_hat.shape:
        raise ValueError(f"y {tuple(y.shape)} and y_hat {tuple(y_hat.shape)} must have the same shape")
    n = y.shape[0]
    # The batch's own centered second moment is computed in the input dtype (no cancellation);
    # only its conversion to raw sums happens in float64, where the cancellation is harmless.
    mean = y.mean(0)  # [L, d]
    m2 = (y - mean).pow(2).sum((0, 2)).double()  # [L]
    sse = (y - y_hat).pow(2).sum((0, 2)).double()  # [L]
    mean64 = mean.double()
    return FVUSums(
        sse=sse,
        sum=mean64 * n,
        sumsq=m2 + n * mean64.pow(2).sum(-1),
        count=torch.tensor(float(n), dtype=torch.float64, device=y.device),
    )


def fvu_per_layer(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """[L] fraction of variance unexplained of one batch (``y`` [..., L, d] raw units)."""
    out_dtype = torch.promote_types(y.dtype, torch.float32)
    return fvu_sums(y, y_hat).fvu().to(out_dtype)


@torch.no_grad()
def l0_per_layer(acts: torch.Tensor) -> torch.Tensor:
    """[L] mean number of active (non-zero) features per token. acts: [..., L, F]."""
    acts = _as_tokens(acts, "acts")
    # summed to [L] before the sum over feature shards: tp sends L numbers, not [N, L]
    return _full((acts != 0).sum(dim=(0, 2))).float() / acts.shape[0]


def l0_of_code(code) -> torch.Tensor:
    """``l0_per_layer`` of the activations behind a ``SparseCode`` (the sparse step's)."""
    return _full(code.active_per_layer()).float() / max(code.idx.shape[0], 1)


class FVUAccumulator:
    """Accumulates ``FVUSums`` over batches (e.g. a logging window); ``compute`` reduces them
    over a process group (all data-parallel ranks) and returns the exact FVU of the union."""

    def __init__(self) -> None:
        self.sums: FVUSums | None = None

    def update(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        s = fvu_sums(y, y_hat)
        self.sums = s if self.sums is None else self.sums + s

    def reset(self) -> None:
        self.sums = None

    def compute(
        self, group: dist.ProcessGroup | None = None, columns: dist.ProcessGroup | None = None
    ) -> torch.Tensor:
        """[L] FVU (float64). With ``group``, a collective: every rank in it must call it.
        ``columns``: ranks that each summed their own columns of the same rows (the code
        tensor-parallel layout); their per-layer sums add up (the column blocks are disjoint)."""
        if self.sums is None:
            raise RuntimeError("FVUAccumulator.compute() called before any update()")
        s = self.sums
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            # One collective for all four sums: pack, reduce, unpack.
            flat = torch.cat([s.sse, s.sum.reshape(-1), s.sumsq, s.count.reshape(1)])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            n_layers, d = s.sum.shape
            sse, rest = flat[:n_layers], flat[n_layers:]
            sm, rest = rest[: n_layers * d].reshape(n_layers, d), rest[n_layers * d :]
            s = FVUSums(sse, sm, rest[:n_layers], rest[n_layers])
        if columns is not None and dist.is_initialized() and dist.get_world_size(columns) > 1:
            # Σ‖y − ȳ‖² = Σ‖y‖² − ‖Σy‖²/n splits into column blocks: reduce the three [L] sums.
            parts = torch.stack([s.sse, s.sumsq, (s.sum * s.sum).sum(-1)])
            dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=columns)
            n = s.count.clamp_min(1)
            var = (parts[1] - parts[2] / n).clamp_min(0)
            return torch.where(var > 0, parts[0] / var, torch.full_like(var, float("nan")))
        return s.fvu()


class DeadFeatureTracker(Stateful):
    """Tokens since each feature last fired; a feature is dead after ``dead_after_tokens``.

    Counts are in tokens of the whole data-parallel group: with ``group`` each update adds
    ``n_tokens × group size`` (every rank sees the same number of rows per step), and a feature
    that fired on any rank has fired. Ranks are reconciled lazily, by one all_reduce(MIN) of the
    counters when a result is asked for (``dead_mask``, ``dead_fraction``, ``state_dict``), so
    those calls are collectives: every rank of the group must make them at the same steps.
    Firing is tracked per batch: a feature that fired anywhere in a batch restarts at 0.
    """

    def __init__(
        self,
        n_layers: int,
        n_features: int,
        dead_after_tokens: int,
        device: torch.device | str | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        self.dead_after_tokens = int(dead_after_tokens)
        self.group = group
        self.tokens_since_fire = torch.zeros(n_layers, n_features, dtype=torch.int64, device=device)
        self._dirty = False

    def _group_size(self) -> int:
        if self.group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.group)

    @torch.no_grad()
    def update(self, acts: torch.Tensor, n_tokens: int | None = None) -> None:
        """acts: [..., L, F] activations of this rank's batch; ``n_tokens`` its rows (default:
        the number of rows of ``acts``)."""
        acts = _as_tokens(acts, "acts")
        fired = (acts != 0).any(0)  # [L, F]
        self.update_fired(fired, acts.shape[0] if n_tokens is None else n_tokens)

    @torch.no_grad()
    def update_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """fired: [L, F] bool, which features fired in a batch of ``n_tokens`` rows."""
        fired = _full(fired)
        if fired.shape != self.tokens_since_fire.shape:
            raise ValueError(
                f"fired mask {tuple(fired.shape)} does not match the tracker's "
                f"{tuple(self.tokens_since_fire.shape)} (n_layers, n_features)"
            )
        self.tokens_since_fire.add_(int(n_tokens) * self._group_size())
        self.tokens_since_fire.masked_fill_(fired.to(self.tokens_since_fire.device), 0)
        self._dirty = True

    def sync(self) -> None:
        """Reconcile ranks (collective when a group is set and counters changed)."""
        if self._dirty and self._group_size() > 1:
            dist.all_reduce(self.tokens_since_fire, op=dist.ReduceOp.MIN, group=self.group)
        self._dirty = False

    def dead_mask(self) -> torch.Tensor:
        """[L, F] bool: features silent for at least ``dead_after_tokens`` tokens."""
        self.sync()
        return self.tokens_since_fire >= self.dead_after_tokens

    def dead_fraction_per_layer(self) -> torch.Tensor:
        """[L] fraction of dead features per layer."""
        return self.dead_mask().float().mean(-1)

    def dead_fraction(self) -> float:
        """Fraction of all features that are dead."""
        return float(self.dead_mask().float().mean())

    def state_dict(self) -> dict[str, Any]:
        self.sync()
        return {"tokens_since_fire": self.tokens_since_fire}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        t = state_dict["tokens_since_fire"]
        if tuple(t.shape) != tuple(self.tokens_since_fire.shape):
            raise ValueError(
                f"dead-feature state has shape {tuple(t.shape)} but the model has "
                f"{tuple(self.tokens_since_fire.shape)} (n_layers, n_features): the checkpoint is "
                "from a different model size; start fresh with --checkpoint.fresh_start"
            )
        self.tokens_since_fire.copy_(t)
        self._dirty = False


def mean_finite(values: torch.Tensor) -> float:
    """Mean of the finite entries (NaN if none): a layer with a constant target has no FVU."""
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else math.nan
