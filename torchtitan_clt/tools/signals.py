"""Stop on SIGTERM / SIGUSR1 without losing the run: finish the step, save it, exit with 75.

What SLURM (``--signal=USR1@120``, and SIGTERM at the time limit), Kubernetes and cloud
preemption send is a request to stop soon. The handler only records it; after each optimizer
step every rank reports whether it got one (a MAX all-reduce of one integer on a CPU group), so
all ranks stop after the same step. The trainer then writes a checkpoint of that step, flushes
the metrics and raises ``Preempted`` (exit code 75, ``tools/exit_codes``); relaunching the same
command resumes from that step.

A second signal ends the process at once (exit 128 + N), without saving. The same signal often
arrives twice within milliseconds (SLURM signals every process of the job step, and the launcher
forwards what it gets to its workers), so signals within ``DEBOUNCE_S`` of the first count as one.
Once the stop checkpoint is written, further signals are ignored: the process is about to exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.tools import watchdog
from torchtitan_clt.tools.logging import logger

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEBOUNCE_S = 2.0


class Preempted(Exception):
    """The run stopped on a signal after saving; the message says where and how to resume."""


class StopRequest:
    """Records SIGTERM / SIGUSR1; ``agreed()`` (a collective) says whether any rank got one."""

    def __init__(self, group: Any = None):
        self.signum: int | None = None
        self.t_signal = 0.0
        self.saved = False  # the stop checkpoint is written: further signals are ignored
        self.group = group
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.t_signal = signum, now
            logger.warning(
                "Received %s: stopping after this step with a checkpoint (a second signal exits at once)",
                signal.Signals(signum).name,
            )
            return
        if self.saved or now - self.t_signal < DEBOUNCE_S:
            return
        os.write(2, f"Received {signal.Signals(signum).name} again: exiting now without saving.\n".encode())
        os._exit(128 + signum)

    def agreed(self) -> int | None:
        """The signal number if any rank got one (every rank must call it at the same step)."""
        got = self.signum or 0
        if self.group is not None:
            t = torch.tensor([got], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            got = int(t.item())
        return got or None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Handlers installed for the training loop, the previous ones restored after it."""
    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo")  # CPU: no device sync for one integer
    stop = StopRequest(group)
    stop.install()
    try:
        with watchdog.training():  # the loop's collectives: parallelism.train_timeout_s
            yield stop
    finally:
        stop.uninstall()


def stop_and_save(trainer: Any, step: int, stop: StopRequest, signum: int) -> None:
    """Save ``step``, flush the metrics, close the data source and raise ``Preempted``."""
    name = signal.Signals(signum).name
    t0 = time.perf_counter()
    ckpt = trainer.checkpointer
    if ckpt is not None:  # (the save's own waits keep the long timeout: manager.py)
        # save() is a no-op when this step's interval checkpoint was just written.
        saved = ckpt.save(step, force=True)
        ckpt.close()  # waits for an async save to be committed on every rank
        took = f" in {time.perf_counter() - t0:.1f} s" if saved else ""
        stop.saved = True
        where = f"checkpoint of step {step} written to {ckpt.folder}{took}"
        todo = f"relaunch the same command to resume from step {step}"
    else:
        stop.saved = True
        where = "nothing saved (checkpoint.enable = false)"
        todo = "the next launch starts from step 0"
    trainer.metrics.close()
    trainer.source.close()
    raise Preempted(f"Stopped by {name} at step {step}/{trainer.cfg.training.steps}: {where}; {todo}.")


def exit_now(code: int) -> None:
    """Flush the logs and leave without the interpreter's teardown (seconds for torch and the
    data libraries, often longer than the save itself): for after a ``Preempted`` stop, when
    the checkpoint is committed and the metrics are closed."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
