"""Checks on a batch before it trains: non-finite activations stop the run before the step.

``all_finite`` is queued with the forward and read with the loss check, so a step costs no extra
device sync; ``describe_nonfinite`` runs only when it failed and names the tensor and the layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ACTIVATIONS_FIX = (
    "Check the LLM's dtype (e.g. --data.model_dtype=float32: float16 overflows in some models), the data "
    "(or the activation cache), and that data.layers are layers the model really has."
)
"""What to check when activations are non-finite (both finiteness checks say it)."""


def all_finite(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: every value of ``x`` and ``y`` is finite (no device sync)."""
    return torch.isfinite(x).all() & torch.isfinite(y).all()


def describe_nonfinite(
    step: int, x: torch.Tensor, y: torch.Tensor, layers: Sequence[int], hook_in: str, hook_out: str
) -> str:
    """What is NaN / inf in ``x`` / ``y`` [B, L, d], naming the LLM layers and hooks."""
    parts = []
    for name, hook, t in (("inputs", hook_in, x), ("targets", hook_out, y)):
        nan = torch.isnan(t).sum(dim=(0, 2)).tolist()  # [L]
        inf = torch.isinf(t).sum(dim=(0, 2)).tolist()
        bad = [
            (layers[i] if i < len(layers) else i, n, f) for i, (n, f) in enumerate(zip(nan, inf)) if n or f
        ]
        if bad:
            where = ", ".join(f"layer {layer} ({n} NaN, {f} inf)" for layer, n, f in bad)
            parts.append(f"{name} ({hook}) at {where}")
    return (
        f"Non-finite activations at step {step}: {'; '.join(parts)} in a batch of {x.shape[0]} rows. "
        f"The optimizer did not take step {step} (the weights are those of step {step - 1}). "
        + ACTIVATIONS_FIX
    )
