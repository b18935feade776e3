"""Test-session setup shared by every test file."""

import os

import torch

# Triton decides at @triton.jit time whether a kernel is interpreted: the environment must say so
# before any test imports a kernel module, or the CPU tests would get compiled (GPU-only) kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
