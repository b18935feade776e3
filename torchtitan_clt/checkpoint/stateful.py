"""``Stateful`` wrappers the checkpoint manager saves: model and optimizer through the
distributed state-dict API (sharded entries reshard on load), and this process's RNG states."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_clt.tools.logging import logger


class ModelWrapper(Stateful):
    """The model's state through ``get_model_state_dict`` / ``set_model_state_dict``: sharded
    (DTensor) entries stay sharded on save and reshard to the current mesh on load."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimizerWrapper(Stateful):
    """One optimizer over ``model``, keyed by parameter FQN (not by position), so it reshards and
    survives a changed parameter order. Use the trainer's container instead if it has one."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class RNGState(Stateful):
    """Python, CPU and CUDA generator states of this process (per rank)."""

    def state_dict(self) -> dict[str, Any]:
        import random

        sd: dict[str, Any] = {"python": random.getstate(), "cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import random

        random.setstate(state_dict["python"])
        # "torch" / one CUDA state: what the trainer's own RNGState wrote before this one served it.
        torch.set_rng_state(state_dict["cpu"] if "cpu" in state_dict else state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if isinstance(states, torch.Tensor):
                torch.cuda.set_rng_state(states)
            elif len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
            else:
                logger.warning(
                    "checkpoint: CUDA RNG saved for %d devices, %d present; not restored",
                    len(states),
                    torch.cuda.device_count(),
                )
