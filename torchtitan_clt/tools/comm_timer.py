"""Wall time spent in torch.distributed collectives, for benchmarks.

``CommTimer`` wraps the collectives of ``torch.distributed`` (the functions FSDP2, the tensor
parallel sums and the selection call) and ``Work.wait``: an asynchronous collective is counted
from its call until its ``wait`` returns, a blocking one for its call. Wall time on the calling
thread, so compute that overlaps a collective is not subtracted (on gloo/CPU little overlaps).
"""

from __future__ import annotations

import functools
import threading
import time

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",  # what FSDP2 calls from torch 2.13 (and the names above call)
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "scatter",
    "barrier",
    "all_to_all_single",
    "isend",
    "irecv",
)


class CommTimer:
    """``with CommTimer() as t: ...``; ``t.seconds``, ``t.calls`` (per collective name)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: list[tuple[object, str, object]] = []
        self._inside = threading.local()

    def total(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def _add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt

    def __enter__(self) -> CommTimer:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved.append((dist, name, fn))
            setattr(dist, name, self._timed(name, fn))
        wait = dist.Work.wait
        self._saved.append((dist.Work, "wait", wait))
        timer = self

        def timed_wait(work, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return wait(work, *args, **kwargs)
            finally:
                timer._add("wait", time.perf_counter() - t0)

        dist.Work.wait = timed_wait
        return self

    def _timed(self, name: str, fn):
        inside = self._inside

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if getattr(inside, "on", False):  # a deprecated name calling its successor: counted once
                return fn(*args, **kwargs)
            inside.on = True
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside.on = False
                self._add(name, time.perf_counter() - t0)
                self.calls[name] = self.calls.get(name, 0) + 1

        return run

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()
