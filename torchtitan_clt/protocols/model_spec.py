"""``ModelSpec``: everything the trainer needs to know about a family, found by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchtitan_clt.protocols.registry import model_registry


@dataclass
class ModelSpec:
    name: str
    """Family name used as ``model.name``."""

    build_fn: Callable[..., Any]
    """``build_fn(args: TranscoderArgs) -> Transcoder``; called under the meta device."""

    parallelize_fn: Callable[..., Any] | None = None
    """``parallelize_fn(model, parallel_dims, job_config) -> model``: applies TP / FSDP from outside."""

    activations: tuple[str, ...] | None = None
    """Activations this family supports (``None``: every registered one)."""

    export_circuit_tracer_fn: Callable[..., Any] | None = None
    """``fn(model, folder, meta: dict)`` writing a circuit-tracer folder, if the family has one."""

    description: str = ""


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    return model_registry.register(spec.name, spec)


def get_model_spec(name: str) -> ModelSpec:
    return model_registry.get(name)
