"""Profiler traces and CUDA memory snapshots, each behind a context manager that is a no-op when
its ``profiling.*`` switch is off.

The trainer calls ``prof.step()`` / ``snap.step()`` once after every optimizer step:

    with maybe_enable_profiling(cfg, run_folder, step) as prof, \\
         maybe_enable_memory_snapshot(cfg, run_folder, step) as snap:
        for step in range(step + 1, total + 1):
            train_step()
            if prof: prof.step()
            if snap: snap.step()

Traces land in ``<run_folder>/<save_traces_folder>/iteration_<N>/rank<r>_trace.json`` (open in
chrome://tracing or https://ui.perfetto.dev); snapshots in
``<run_folder>/<save_memory_snapshot_folder>/iteration_<N>/rank<r>_memory_snapshot.pickle``
(https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_clt.tools.logging import logger

# Entries kept by the CUDA allocator's history: enough for a few steps of a large run.
MEMORY_HISTORY_MAX_ENTRIES = 100_000


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_window(freq: int, warmup: int, active: int) -> int:
    from torchtitan_clt.config import ConfigError

    wait = freq - warmup - active
    if active < 1 or warmup < 0 or wait < 0:
        raise ConfigError(
            f"profiling: profile_freq ({freq}) must be at least profile_warmup ({warmup}) + "
            f"profile_active ({active}), and profile_active at least 1; e.g. "
            f"--profiling.profile_freq={max(warmup + max(active, 1), 1)}"
        )
    return wait


@contextlib.contextmanager
def maybe_enable_profiling(
    job_config, run_folder: str | Path, global_step: int = 0
) -> Iterator[torch.profiler.profile | None]:
    """A ``torch.profiler.profile`` recording ``profile_active`` steps (after ``profile_warmup``)
    at the end of every ``profile_freq`` steps, or None when profiling is off.

    ``global_step`` is the step the run starts from, so a resumed run profiles the same steps.
    """
    cfg = job_config.profiling
    if not cfg.enable_profiling:
        yield None
        return

    wait = _check_window(cfg.profile_freq, cfg.profile_warmup, cfg.profile_active)
    trace_root = Path(run_folder) / cfg.save_traces_folder
    rank = _rank()

    def export(prof: torch.profiler.profile) -> None:
        # step_num is the last step of the window: prof.step() has just been called after it.
        folder = trace_root / f"iteration_{prof.step_num}"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prof.export_chrome_trace(str(folder / f"rank{rank}_trace.json"))
        logger.info(f"Profiler trace written to {folder} in {time.perf_counter() - t0:.2f}s")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=cfg.profile_warmup, active=cfg.profile_active),
        on_trace_ready=export,
        record_shapes=True,
    )
    # Align the schedule with the global step before it starts, so that windows fall on the same
    # steps whether or not the run was resumed.
    prof.step_num = global_step
    prof.current_action = prof.schedule(global_step)
    logger.info(f"Profiling {cfg.profile_active} step(s) every {cfg.profile_freq}; traces go to {trace_root}")
    with prof:
        yield prof


class MemorySnapshotter:
    """Records the CUDA allocator's history and dumps it every ``freq`` steps (and on a crash)."""

    def __init__(self, folder: Path, freq: int, start_step: int, rank: int):
        self.folder, self.freq, self.step_num, self.rank = folder, freq, start_step, rank
        # No public API exists for this: the underscore functions are the documented way
        # (https://pytorch.org/docs/stable/torch_cuda_memory.html); the caller checks they exist.
        torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_MAX_ENTRIES)

    def step(self, exit_ctx: bool = False) -> None:
        """Call after each step; with ``exit_ctx`` dumps now (the run is ending abnormally)."""
        if not exit_ctx:
            self.step_num += 1
            if self.step_num % self.freq != 0:
                return
        name = f"iteration_{self.step_num}" + ("_exit" if exit_ctx else "")
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(folder / f"rank{self.rank}_memory_snapshot.pickle", "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        logger.info(f"Memory snapshot written to {folder} in {time.perf_counter() - t0:.2f}s")

    def stop(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


@contextlib.contextmanager
def maybe_enable_memory_snapshot(
    job_config, run_folder: str | Path, global_step: int = 0
) -> Iterator[MemorySnapshotter | None]:
    """A ``MemorySnapshotter`` when ``profiling.enable_memory_snapshot`` is on and CUDA is
    present; otherwise None (with a log line saying why, if it was asked for)."""
    cfg = job_config.profiling
    if not cfg.enable_memory_snapshot:
        yield None
        return
    if not torch.cuda.is_available():
        logger.info("profiling.enable_memory_snapshot is on but there is no CUDA device: skipped")
        yield None
        return
    if not hasattr(torch.cuda.memory, "_record_memory_history"):
        logger.warning("this torch build cannot record CUDA memory history: snapshots skipped")
        yield None
        return
    folder = Path(run_folder) / cfg.save_memory_snapshot_folder
    snap = MemorySnapshotter(folder, cfg.profile_freq, global_step, _rank())
    logger.info(f"Memory snapshots every {cfg.profile_freq} steps go to {folder}")
    try:
        yield snap
    except torch.cuda.OutOfMemoryError:
        snap.step(exit_ctx=True)
        raise
    finally:
        snap.stop()
