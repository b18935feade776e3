"""Optimizers: one per model part, held in a ``Stateful`` container, plus gradient clipping.

The container's state goes through ``torch.distributed.checkpoint.state_dict``, which names the
state by parameter FQN and handles FSDP2 / TP (DTensor) parameters, so a checkpoint written on
one mesh loads on another.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_clt.config.job_config import Optimizer
from torchtitan_clt.tools.logging import logger

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
# Flattened: keys are "state.<fqn>.<name>" / "param_groups.<fqn>.<name>", which lets DCP reshard.
_SD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class OptimizersContainer(Stateful):
    """One optimizer per model part, stepped together; ``state_dict`` merges theirs."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type, kwargs: dict[str, Any]):
        self.model_parts = model_parts
        self.optimizers: list[torch.optim.Optimizer] = []
        for part in model_parts:
            params = [p for p in part.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"model part {type(part).__name__} has no trainable parameters")
            self.optimizers.append(_make(optimizer_cls, _groups_by_mesh(params), kwargs))

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """``found_inf``: a device scalar, nonzero to skip the update on the device (fused
        optimizers only: ``skips_on_device``)."""
        for o in self.optimizers:
            if found_inf is None:
                o.step()
                continue
            o.found_inf, o.grad_scale = found_inf, None  # what torch's fused Adam(W) reads
            try:
                o.step()
            finally:
                del o.found_inf, o.grad_scale

    def skips_on_device(self) -> bool:
        """Every optimizer can skip a step from a device flag (torch's fused Adam and AdamW)."""
        return all(o.defaults.get("fused") for o in self.optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, opt in zip(self.model_parts, self.optimizers):
            sd = get_optimizer_state_dict(part, opt, options=_SD_OPTIONS)
            clash = merged.keys() & sd.keys()
            if clash:
                raise ValueError(
                    f"model parts share parameter names ({sorted(clash)[:3]}...); give each part "
                    "distinct submodule names so their optimizer states can be told apart"
                )
            merged.update(sd)
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, opt, optim_state_dict=state_dict, options=_SD_OPTIONS)


def _groups_by_mesh(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    # torch's foreach / fused kernels run once per param group and cannot mix DTensor and plain
    # tensors (or DTensors of different meshes) in one call: one group per mesh keeps them apart.
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        groups.setdefault(id(mesh) if mesh is not None else None, []).append(p)
    return [{"params": ps} for ps in groups.values()]


def _make(cls: type, params: list[dict[str, Any]], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    kwargs = dict(kwargs)
    fused = kwargs.pop("fused", None)
    if fused is None:  # "auto": fused wherever this torch supports it for these parameters
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError) as e:  # e.g. a device or dtype without a fused kernel
            logger.info(f"Fused {cls.__name__} not available here ({e}); using the foreach kernel")
            return cls(params, fused=False, **kwargs)
    return cls(params, fused=fused, **kwargs)


def build_optimizer(model_parts: nn.Module | list[nn.Module], cfg: Optimizer) -> OptimizersContainer:
    """Optimizers from the ``[optimizer]`` section for the trainable parameters of each part."""
    from torchtitan_clt.config import ConfigError

    if cfg.name not in _OPTIMIZERS:
        raise ConfigError(f"optimizer.name = {cfg.name!r}; choose one of {sorted(_OPTIMIZERS)}")
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    kwargs: dict[str, Any] = {
        "lr": cfg.lr,
        "betas": (cfg.beta1, cfg.beta2),
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        "fused": {"auto": None, "true": True, "false": False}[cfg.fused],
    }
    if cfg.name == "adam" and cfg.weight_decay:
        logger.warning("optimizer.name = 'adam' applies weight_decay as L2; 'adamw' decouples it")
    return OptimizersContainer(parts, _OPTIMIZERS[cfg.name], kwargs)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip gradients to a total norm of ``max_norm`` and return the total norm before clipping.

    Works with DTensor gradients: each group of gradients sharing a device mesh is normed
    separately, its (partial) norm reduced over the mesh with ``full_tensor()``, and the groups are
    combined, so the result is the norm of the full gradient whatever the sharding. ``max_norm``
    <= 0 only measures.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if all(p.grad is None for p in params):
        return torch.tensor(0.0)
    norm_type = float(norm_type)

    # Gradients sharing a device mesh (or plain tensors, under None) are normed together.
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            mesh = getattr(p.grad, "device_mesh", None)
            groups.setdefault(id(mesh) if mesh is not None else None, []).append(p)
    norms = []
    for ps in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type=norm_type)
        if hasattr(n, "full_tensor"):  # a DTensor norm is partial until reduced over its mesh
            n = n.full_tensor()
        norms.append(n)
    device = norms[0].device
    norms = [n.to(device) for n in norms]
    if math.isinf(norm_type):
        total = torch.stack(norms).max()
    else:
        total = torch.stack(norms).pow(norm_type).sum().pow(1.0 / norm_type)

    if max_norm > 0:
        # Per group: torch's foreach multiply cannot mix DTensor and plain gradients in one call.
        for ps in groups.values():
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total.to(norms[0].device))
    return total
