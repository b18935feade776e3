"""Which implementation runs each kernel: Triton or the torch fallback.

One process-wide setting (``--kernels.backend``, ``--kernels.sparse_density_threshold``) read by
every op in ``dispatch.py``; an op may also be given ``backend=`` explicitly (tests do).

``auto`` picks Triton for CUDA tensors when Triton is installed, torch otherwise. ``triton`` on CPU
tensors only works under the Triton interpreter (``TRITON_INTERPRET=1``), which is how CI runs the
kernels without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from torchtitan_clt.config.job_config import Kernels

_VALID = ("auto", "torch", "triton")


@dataclass
class KernelOptions:
    backend: str = "auto"
    """``auto`` | ``torch`` | ``triton``."""

    sparse_density_threshold: float = 0.05
    """Above this fraction of active features the decoder runs dense."""


_options = KernelOptions()


def has_triton() -> bool:
    """Triton importable (checked without importing it: importing is slow and may fail on CPU-only
    builds)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or stubbed-out install
        return False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def configure(backend: str | None = None, sparse_density_threshold: float | None = None) -> KernelOptions:
    """Set the process-wide kernel options; returns the options now in force."""
    if backend is not None:
        if backend not in _VALID:
            raise ValueError(f"kernels.backend={backend!r}: use one of {', '.join(_VALID)}")
        if backend == "triton" and not has_triton():
            raise ValueError(
                "kernels.backend='triton' but Triton is not installed: `pip install triton` "
                "(Linux + CUDA), or use --kernels.backend=torch"
            )
        _options.backend = backend
    if sparse_density_threshold is not None:
        if not 0.0 <= sparse_density_threshold <= 1.0:
            raise ValueError(
                f"kernels.sparse_density_threshold={sparse_density_threshold}: must lie in [0, 1]"
            )
        _options.sparse_density_threshold = float(sparse_density_threshold)
    return _options


def configure_from_job(k: Kernels) -> KernelOptions:
    """Apply the ``[kernels]`` section (the trainer calls this once at start-up)."""
    return configure(k.backend, k.sparse_density_threshold)


def options() -> KernelOptions:
    return _options


def resolve_backend(t: torch.Tensor, backend: str | None = None) -> str:
    """The backend an op on tensor ``t`` runs with: ``"torch"`` or ``"triton"``."""
    b = backend or _options.backend
    if b not in _VALID:
        raise ValueError(f"kernel backend {b!r}: use one of {', '.join(_VALID)}")
    if b == "torch":
        return "torch"
    usable = has_triton() and (t.is_cuda or (t.device.type == "cpu" and triton_interpreting()))
    if b == "auto":
        return "triton" if (usable and t.is_cuda) else "torch"
    if not usable:
        raise RuntimeError(
            f"kernel backend 'triton' cannot run on a {t.device.type} tensor"
            + ("" if has_triton() else " (Triton is not installed)")
            + ": use --kernels.backend=auto|torch, or set TRITON_INTERPRET=1 to run the kernels"
            " on CPU in the (slow) interpreter"
        )
    return "triton"
