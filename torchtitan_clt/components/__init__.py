"""Training components the trainer builds from the config: optimizers and LR schedulers."""

from torchtitan_clt.components.lr_scheduler import (
    LRSchedulersContainer,
    build_lr_scheduler,
    warmup_stable_decay,
)
from torchtitan_clt.components.optimizer import OptimizersContainer, build_optimizer, clip_grad_norm_

__all__ = [
    "LRSchedulersContainer",
    "OptimizersContainer",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_grad_norm_",
    "warmup_stable_decay",
]
