"""Small helpers: the training device, determinism, peak memory, controlled garbage collection."""

from __future__ import annotations

import gc
import os
import random
import resource
import sys
import time

import torch

from torchtitan_clt.tools.logging import logger

GIB = 1024**3


def device_from_config(job_config) -> torch.device:
    """The training device from ``training.device``; under torchrun each rank takes the CUDA
    device of its ``LOCAL_RANK``."""
    from torchtitan_clt.config import ConfigError  # config is a leaf; imported late to stay cheap

    want = job_config.training.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "training.device = 'cuda' but no CUDA device is visible; use --training.device=cpu "
            "(or auto), or check CUDA_VISIBLE_DEVICES and the torch build (torch.version.cuda)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def set_determinism(seed: int, deterministic: bool = False) -> None:
    """Seed every RNG; with ``deterministic`` also ask for deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        logger.info("Deterministic algorithms enabled (slower on GPU)")


def peak_memory_gib(device: torch.device | str | None = None) -> float:
    """Peak memory so far: CUDA caching-allocator peak on a GPU, process peak RSS on the CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB


class GarbageCollection:
    """Python's automatic GC pauses at random steps (and on every rank at different times, which
    stalls collectives); turn it off and collect every ``every`` steps instead (0: leave GC alone)."""

    def __init__(self, every: int = 1000):
        self.every = every
        if every > 0:
            gc.disable()
            gc.collect(1)

    def run(self, step: int) -> None:
        if self.every > 0 and step > 0 and step % self.every == 0:
            t0 = time.perf_counter()
            gc.collect(1)
            logger.debug(f"GC collect at step {step} took {time.perf_counter() - t0:.3f}s")

    def close(self) -> None:
        if self.every > 0:
            gc.enable()
