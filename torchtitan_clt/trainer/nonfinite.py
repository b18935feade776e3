"""Non-finite steps caught without a host sync (``training.nonfinite_check = "deferred"``).

Checking the loss between forward and backward makes the CPU wait for the GPU at every step.
Here each step's finiteness stays on the device: the inputs and targets per layer, the loss and
the gradient norm are reduced to flags, the verdict is summed over the mesh (every rank skips or
none), handed to the fused optimizer as ``found_inf`` (the update of a non-finite step is skipped
on the device, as a GradScaler does) and copied to the host asynchronously. The host reads it
``LAG`` steps later, when the GPU has long finished that step, and at once wherever a bad step must
go no further: a logged step, a checkpoint, a preemption save, the end of training.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.checkpoint.layout import list_checkpoints
from torchtitan_clt.errors import TrainingError
from torchtitan_clt.tools.guards import ACTIVATIONS_FIX

LAG = 2
"""Steps between a step and the host's read of its flags (the CPU runs about one step ahead)."""


@dataclass
class _Pending:
    step: int
    flags: torch.Tensor
    """On the host, uint8 ``[2L + 2]``: inputs finite per layer, targets finite per layer, the
    loss finite, and the step's verdict over the mesh (1: its update was skipped)."""
    ready: Any
    """A CUDA event recorded after the copy (None on CPU)."""


def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


class NonFiniteGuard:
    """``observe`` each micro-batch, ``verdict`` before the optimizer step, ``queue`` after it,
    ``check`` to raise for a queued bad step (all of them with ``flush``)."""

    def __init__(
        self, n_layers: int, device: torch.device, layers: Sequence[int], hook_in: str, hook_out: str
    ):
        self.n_layers, self.device = n_layers, device
        self.layers, self.hook_in, self.hook_out = list(layers), hook_in, hook_out
        self.pending: deque[_Pending] = deque()
        self.checkpoints: Path | None = None
        """The run's checkpoint folder (None: none written): the error names its newest one."""
        self._flags: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        """One micro-batch's ``x [B, L, d_in]``, ``y [B, L, d_out]`` and loss (no sync)."""
        f = torch.cat(
            [
                torch.isfinite(x).flatten(2).all(2).all(0),
                torch.isfinite(y).flatten(2).all(2).all(0),
                torch.isfinite(loss.detach()).reshape(1),
            ]
        )
        self._flags = f if self._flags is None else self._flags & f

    def verdict(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """``found_inf`` for the optimizer: 1.0 when any rank's step was non-finite, else 0.0."""
        assert self._flags is not None, "observe() the step's micro-batches first"
        norm_ok = torch.isfinite(grad_norm.to(self.device)).reshape(1)
        found = (~(self._flags.all().reshape(1) & norm_ok)).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return found.reshape(())

    def queue(self, step: int, found: torch.Tensor) -> None:
        """Start the copy of this step's flags to the host; nothing waits for it."""
        assert self._flags is not None
        flags = torch.cat([self._flags.to(torch.uint8), found.reshape(1).to(torch.uint8)])
        self._flags = None
        ready = None
        if on_gpu(flags.device):
            host = torch.empty(flags.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            flags = host
        self.pending.append(_Pending(step, flags, ready))

    def check(self, step: int, flush: bool = False) -> None:
        """Raise ``TrainingError`` for the first queued bad step: those at least ``LAG`` steps
        before ``step``, or every queued one with ``flush`` (waits for the device)."""
        while self.pending and (flush or self.pending[0].step <= step - LAG):
            p = self.pending.popleft()
            flags = self._read(p)
            if flags[-1]:
                raise TrainingError(self._describe(p.step, step, flags))

    def _read(self, p: _Pending) -> Any:
        if p.ready is not None:
            p.ready.synchronize()  # that step's copy only; long done unless flushing
        return p.flags.numpy()  # a host buffer: reading it is not a device sync

    def _describe(self, bad: int, now: int, flags: Any) -> str:
        L = self.n_layers
        parts = []
        for name, hook, ok in (
            ("inputs", self.hook_in, flags[:L]),
            ("targets", self.hook_out, flags[L : 2 * L]),
        ):
            where = [str(self.layers[i] if i < len(self.layers) else i) for i in range(L) if not ok[i]]
            if where:
                parts.append(f"{name} ({hook}) at layer{'s' if len(where) > 1 else ''} {', '.join(where)}")
        if parts:
            what = f"Non-finite activations at step {bad}: {'; '.join(parts)}"
            fix = ACTIVATIONS_FIX
        else:
            what = f"Non-finite {'loss' if not flags[2 * L] else 'gradients'} at step {bad}"
            if flags[2 * L]:
                what += " (on another rank, or in the gradient norm)"
            fix = (
                "Lower optimizer.lr, raise training.max_norm clipping, or check the data for NaNs "
                "(--training.nonfinite_check=every_step names the terms, at one host sync per step)."
            )
        done = list_checkpoints(self.checkpoints)[0] if self.checkpoints is not None else []
        ckpt = f"the last checkpoint is step {done[-1]}" if done else "no checkpoint was written"
        return (
            f"{what}. The optimizer skipped step {bad}'s update on the device; training stopped at "
            f"step {now}, before writing anything from it ({ckpt}). {fix}"
        )
