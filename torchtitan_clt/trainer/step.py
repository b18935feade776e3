"""One optimizer step: ``grad_accum_steps`` micro-batches forward and backward, then the update.

``TrainStep`` holds the parts a step touches and returns a ``StepStats``; it keeps nothing of one
step for the next except what the parts themselves keep (the optimizer, the dead-feature counts).

Accumulated micro-batches train what one forward of the whole batch would: the losses are means
over tokens (each micro-batch's divided by their number), the dead-feature counts take the step's
firing once, and BatchTopK selects over the whole step (``kernels/step_selection.py``: a first pass
without gradients finds the step's threshold, then each micro-batch trains on its share of the
selection). AuxK alone stays per micro-batch: its normaliser ‖e − ē‖² is a batch statistic.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from torchtitan_clt.components.decoder_constraint import UnitNormDecoder
from torchtitan_clt.components.lr_scheduler import LRSchedulersContainer
from torchtitan_clt.components.optimizer import OptimizersContainer, clip_grad_norm_
from torchtitan_clt.data.source import ActivationSource
from torchtitan_clt.distributed.tp_code import local_out_buffers, own_columns
from torchtitan_clt.errors import TrainingError
from torchtitan_clt.kernels.step_selection import StepSelection
from torchtitan_clt.metrics.training import DeadFeatureTracker, FVUAccumulator, l0_of_code, l0_per_layer
from torchtitan_clt.models.common import selection_of
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderOutput
from torchtitan_clt.tools.guards import all_finite, describe_nonfinite
from torchtitan_clt.trainer.nonfinite import NonFiniteGuard


@dataclass
class StepStats:
    """What one step measured; device tensors, read only when the step is logged."""

    loss: torch.Tensor
    """Mean total loss over the micro-batches (scalar)."""
    grad_norm: torch.Tensor
    """Before clipping."""
    terms: dict[str, torch.Tensor]
    """The loss's terms, each the mean over the micro-batches."""
    data_wait_s: float
    """Seconds spent waiting for activations."""
    fvu: FVUAccumulator | None = None
    """The raw-unit FVU sums of the step's rows, when collected."""
    l0: list[torch.Tensor] = field(default_factory=list)
    """``[L]`` mean L0 per micro-batch, when collected."""


@dataclass
class TrainStep:
    model: Transcoder
    forward: Callable[[torch.Tensor], TranscoderOutput]
    """``model.forward_std`` (compiled when ``training.compile``)."""
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    optimizers: OptimizersContainer
    lr_schedulers: LRSchedulersContainer
    source: ActivationSource
    dead: DeadFeatureTracker
    decoder_constraint: UnitNormDecoder | None
    micro_batch: int
    grad_accum_steps: int
    max_norm: float
    device: torch.device
    autocast_dtype: torch.dtype | None
    y_columns: Any = None
    """The tp group whose ranks each hold their own columns of ŷ and y (``parallelism.tp_layout =
    "code"``): the step reads, standardizes and measures only this rank's columns; None otherwise."""
    guard: NonFiniteGuard | None = None
    """``training.nonfinite_check = "deferred"``: the step's finiteness stays on the device (a
    non-finite step's update is skipped there) and is read later (``trainer/nonfinite.py``); None:
    checked between forward and backward, one host sync per micro-batch."""

    def __call__(self, step: int, collect: bool = False) -> StepStats:
        """Train one step; ``collect``: also gather the FVU sums and L0 (the logged steps)."""
        stats = StepStats(
            loss=torch.zeros((), device=self.device),
            grad_norm=torch.zeros(()),
            terms={},
            data_wait_s=0.0,
            fvu=FVUAccumulator() if collect else None,
        )
        if self.guard is not None:
            self.guard.check(step)  # a step LAG back: long finished on the device
        n = self.grad_accum_steps
        fired, rows = None, 0
        act = getattr(self.model, "activation", None)
        sel = selection_of(act) if act is not None else None
        if n > 1 and sel is not None and sel.kind == "batchtopk":
            batches = [self._next_batch(stats) for _ in range(n)]  # the step's inputs, never its h
            chosen = self._select_over_step(act, sel, batches)
            for j, (x, y) in enumerate(batches):
                with act.fixed_ids(chosen.ids(j)):
                    fired = self._micro_step(step, stats, x, y, fired)
                rows += x.shape[0]
        else:
            for _ in range(n):
                x, y = self._next_batch(stats)
                fired = self._micro_step(step, stats, x, y, fired)
                rows += x.shape[0]
        self.dead.update_fired(fired, rows)  # once per step: a feature fired in any micro-batch
        stats.loss /= n
        stats.terms = {k: v / n for k, v in stats.terms.items()}
        if self.decoder_constraint is not None:
            self.decoder_constraint.project_grads()
        stats.grad_norm = clip_grad_norm_(self.model.parameters(), self.max_norm)
        found = self.guard.verdict(stats.grad_norm) if self.guard is not None else None
        self.optimizers.step(found_inf=found)
        if self.decoder_constraint is not None:
            self.decoder_constraint.normalize()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        if self.guard is not None:
            self.guard.queue(step, found)
            if collect:  # a logged step reads the loss anyway: nothing non-finite gets logged
                self.guard.check(step, flush=True)
        return stats

    def _columns(self):
        """The model's ``out_mean`` / ``out_scale`` as this rank's columns (the code layout)."""
        if self.y_columns is None:
            return contextlib.nullcontext()
        return local_out_buffers(self.model, self.y_columns)

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def _next_batch(self, stats: StepStats) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        x, y = self.source.next_batch(self.micro_batch)  # [B, L, d_in], [B, L, d_out] raw
        stats.data_wait_s += time.perf_counter() - t0
        if self.y_columns is not None:  # [B, L, d_out / tp]
            y = own_columns(y, self.y_columns, self.model.args.d_out)
        return x, y

    def _select_over_step(self, act, sel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepSelection:
        """BatchTopK's selection over all the step's micro-batches, on every rank of the mesh: the
        first pass (``model.encode``: FSDP gathers the weights for it, tp keeps local features)."""
        g = self.model.mesh_groups
        chosen = StepSelection(sel, sum(x.shape[0] for x, _ in batches), g.batch, g.batch_scale)
        with act.collecting(chosen), torch.no_grad(), self._autocast():
            for x, _ in batches:
                self.model.encode(x)
        chosen.finish()
        act.observe_step(chosen)  # the threshold EMA, once, before the losses read it
        return chosen

    def _micro_step(
        self, step: int, stats: StepStats, x: torch.Tensor, y: torch.Tensor, fired: torch.Tensor | None
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns ``fired`` or-ed with its firing."""
        m = self.model
        batch_ok = all_finite(x, y) if self.guard is None else None  # read with the loss check
        xs = m.standardize_in(x)
        with self._columns():
            ys = m.standardize_out(y)
        with self._autocast():
            out = self.forward(xs)
            loss, terms = self.loss_fn(m, out, ys, step)
        if self.guard is not None:
            self.guard.observe(x, y, loss)
        elif not bool(torch.isfinite(loss) & batch_ok):
            if not bool(batch_ok):
                src = self.source
                raise TrainingError(describe_nonfinite(step, x, y, src.layers, src.hook_in, src.hook_out))
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise TrainingError(
                f"Non-finite loss at step {step}: {loss.item()} (non-finite terms: {', '.join(bad) or 'none'}; "
                f"terms { ({k: float(v) for k, v in terms.items()}) }). Lower optimizer.lr, raise "
                "training.max_norm clipping, or check the data for NaNs. Weights were not updated."
            )
        (loss / self.grad_accum_steps).backward()
        code = out.code  # the sparse step: counted from the (id, value) pairs, no [N, L, F] tensor
        acts = out.acts.detach() if code is None else None
        now = code.fired() if code is not None else (acts != 0).reshape(-1, *acts.shape[-2:]).any(0)  # [L, F]
        if stats.fvu is not None:
            with torch.no_grad():
                y_hat = out.y_hat.detach().float()
                if self.y_columns is not None:  # this rank's columns; compute() sums over tp
                    y_hat = y_hat.to_local() if isinstance(y_hat, DTensor) else y_hat
                with self._columns():
                    stats.fvu.update(y, m.unstandardize_out(y_hat))
                stats.l0.append(l0_per_layer(acts) if code is None else l0_of_code(code))
        for k, v in terms.items():
            stats.terms[k] = stats.terms.get(k, 0.0) + v.detach().float()
        stats.loss += loss.detach()
        return now if fired is None else fired | now
