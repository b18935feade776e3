"""Checkpoints (DCP manager, retention, async) and exports (native, circuit-tracer).

Names are imported lazily, so that ``import torchtitan_clt.checkpoint.export`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointManager": "manager",
    "ModelWrapper": "stateful",
    "OptimizerWrapper": "stateful",
    "RNGState": "stateful",
    "list_checkpoints": "layout",
    "resolve_checkpoint": "layout",
    "load_model_from_checkpoint": "offline",
    "export_circuit_tracer": "circuit_tracer",
    "load_circuit_tracer": "circuit_tracer",
    "CircuitTracerExportError": "circuit_tracer",
    "export_native": "export",
    "load_pretrained": "export",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
