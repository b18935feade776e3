"""Test-session setup shared by every test file."""

import os

import pytest
import torch

# Triton decides at @triton.jit time whether a kernel is interpreted: the environment must say so
# before any test imports a kernel module, or the CPU tests would get compiled (GPU-only) kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _kernel_backends():
    from torchtitan_clt.kernels.backend import has_triton

    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))]


# The modules holding @triton.jit kernels, each with one kernel that shows how it was decorated.
TRITON_MODULES = (("select_triton", "_compact_kernel"), ("decode_triton", "_fwd_kernel"))


def _interpreted_kernels() -> None:
    """(Re)import the Triton kernel modules under ``TRITON_INTERPRET=1``: the interpreter is chosen
    when a kernel is decorated, so a module imported before the flag was set holds compiled ones."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    for name, kernel in TRITON_MODULES:
        mod = importlib.import_module(f"torchtitan_clt.kernels.{name}")
        if not isinstance(getattr(mod, kernel), InterpretedFunction):
            importlib.reload(mod)


def _compiled_kernels() -> None:
    """The inverse, for the GPU tests: an earlier test's ``backend`` fixture leaves the modules
    interpreted for the rest of the session, so a GPU run would otherwise test the interpreter."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    for name, kernel in TRITON_MODULES:
        mod = importlib.import_module(f"torchtitan_clt.kernels.{name}")
        if isinstance(getattr(mod, kernel), InterpretedFunction):
            importlib.reload(mod)


@pytest.fixture(params=_kernel_backends())
def backend(request, monkeypatch):
    """Each kernel test on the torch fallback and on Triton (interpreted on CPU)."""
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _interpreted_kernels()
    return request.param


@pytest.fixture
def triton_interpreted(monkeypatch):
    """The Triton kernels under the interpreter (CPU tensors), whatever an earlier test loaded."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _interpreted_kernels()


@pytest.fixture
def triton_compiled(monkeypatch):
    """The Triton kernels compiled for CUDA (tests/unit/test_kernels_gpu.py)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _compiled_kernels()
