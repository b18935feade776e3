"""Warmup-stable-decay learning rate, one ``LambdaLR`` per optimizer, in a ``Stateful`` container.

Step convention: the factor for optimizer step t (1-based, t = 1..total) is ``factor(t - 1)``,
where the argument counts the steps already taken (``LambdaLR``'s ``last_epoch``).

    warmup  t <= W:            start + (1 − start)·t/W        (reaches 1 at t = W; never 0)
    stable:                    1
    decay   t > total − D:     p = (t − (total − D))/D ∈ (0, 1], factor = min + (1 − min)·g(p)
                               linear g = 1 − p, cosine g = (1 + cos πp)/2, constant g = 1
    after the last step:       the last step's factor

D = round(decay_ratio · total); if warmup and decay overlap, the decay starts when warmup ends.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LambdaLR

from torchtitan_clt.config.job_config import LRScheduler
from torchtitan_clt.tools.logging import logger


def warmup_stable_decay(
    step: int,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int,
    warmup_start_factor: float = 0.0,
    decay_type: str = "linear",
    min_lr_factor: float = 0.0,
) -> float:
    """LR factor after ``step`` completed optimizer steps (the factor of step t = step + 1)."""
    t = min(step + 1, total_steps)
    if t <= warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * t / warmup_steps
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or t <= decay_start or decay_type == "constant":
        return 1.0
    p = (t - decay_start) / decay_steps
    g = 1.0 - p if decay_type == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return min_lr_factor + (1.0 - min_lr_factor) * g


class LRSchedulersContainer(Stateful):
    """One ``LambdaLR`` per optimizer of an ``OptimizersContainer``, stepped together.

    Its state is the number of steps taken; loading it sets every group's lr from the current
    config, so a resumed run follows the schedule its config describes.
    """

    def __init__(self, optimizers, lr_lambda):
        self.lr_lambda = lr_lambda
        self.schedulers = [LambdaLR(opt, lr_lambda) for opt in optimizers]

    def __iter__(self):
        return iter(self.schedulers)

    def __len__(self) -> int:
        return len(self.schedulers)

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    @property
    def last_step(self) -> int:
        return self.schedulers[0].last_epoch

    def get_last_lr(self) -> float:
        """The lr of the first parameter group (what is logged)."""
        return float(self.schedulers[0].optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = int(state_dict["last_step"])
        factor = self.lr_lambda(step)
        for s in self.schedulers:
            s.last_epoch = step
            for group, base in zip(s.optimizer.param_groups, s.base_lrs):
                group["lr"] = base * factor


def build_lr_scheduler(optimizers, cfg: LRScheduler, total_steps: int) -> LRSchedulersContainer:
    """Schedulers from the ``[lr_scheduler]`` section over ``total_steps`` (``training.steps``)."""
    from torchtitan_clt.config import ConfigError

    total = total_steps
    if total < 1:
        raise ConfigError(f"training.steps = {total}: must be at least 1")
    if not 0.0 <= cfg.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio = {cfg.decay_ratio}: must be in [0, 1]")
    if cfg.decay_type not in ("linear", "cosine", "constant"):
        raise ConfigError(f"lr_scheduler.decay_type = {cfg.decay_type!r}: use linear, cosine or constant")
    warmup = max(int(cfg.warmup_steps), 0)
    if warmup > total:
        raise ConfigError(f"lr_scheduler.warmup_steps = {warmup} exceeds training.steps = {total}; lower it")
    decay = round(cfg.decay_ratio * total)
    if warmup + decay > total:
        logger.warning(
            f"lr_scheduler: warmup ({warmup}) + decay ({decay}) steps exceed training.steps "
            f"({total}); the decay is shortened to the {total - warmup} steps after warmup"
        )
        decay = total - warmup
    fn = functools.partial(
        warmup_stable_decay,
        total_steps=total,
        warmup_steps=warmup,
        decay_steps=decay,
        warmup_start_factor=cfg.warmup_start_factor,
        decay_type=cfg.decay_type,
        min_lr_factor=cfg.min_lr_factor,
    )
    return LRSchedulersContainer(optimizers, fn)
