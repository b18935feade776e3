"""Hang detection for the training loop: name the rank that stopped answering and the collective.

A rank that is stopped (SIGSTOP), frozen, or on a node that vanished without closing its sockets
leaves every other rank blocked in its next collective until the process group's timeout
(``parallelism.init_timeout_s``, long: it also covers loading the LLM and the first refill), and
gloo's timeout error names neither. Here each rank runs a thread that

- writes a heartbeat to torchrun's key-value store every ``tick_s`` (a counter, and the collective
  this rank's main thread is blocked in, if any: the ``torch.distributed`` collectives are wrapped
  while the watchdog runs, as ``tools/comm_timer.py`` does for timing);
- while training (``training()``, entered by ``tools/signals.stop_on_signals``), when its main
  thread has waited in one collective longer than ``parallelism.train_timeout_s``, reads every
  rank's heartbeat twice, ``stale_s`` apart. Ranks whose heartbeat did not move stopped answering:
  the thread logs them with the collective and where it was called, writes that to torchrun's error
  file (so the launcher's restart line carries it) and exits the process with ``exit_codes.HUNG``
  (4); the launcher restarts the job from its last complete checkpoint. If every rank still
  answers, one of them is busy outside the collective (rank 0 evaluating, a long refill): that is
  reported once per timeout and the wait goes on (the process group's own timeout still bounds it).

Checkpoint saves during training (``long_phase``) wait on the file system as much as on a rank, so
there a wait past the timeout alone ends nothing: only a rank whose heartbeat stood still for a
longer window (``long_stale_s``, up to a minute: a save may hold the interpreter a while) does, as
a rank stopped inside a save would otherwise hold every other one for ``init_timeout_s``.

Without torchrun's store (tests under ``mp.start_processes``) no watchdog runs. On NCCL a
collective returns before it completes, so the thread sees no wait; there the launcher turns on
NCCL's flight recorder (``TORCH_NCCL_DUMP_ON_TIMEOUT``) and the group's timeout drops to the
training timeout when training starts (``distributed/utils.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from torchtitan_clt.tools import exit_codes
from torchtitan_clt.tools.logging import logger

# The blocking entry points of torch.distributed that the loop, FSDP2, tp and DCP call.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",  # what FSDP2 calls from torch 2.13
    "all_gather_object",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "broadcast_object_list",
    "scatter",
    "gather_object",
    "scatter_object_list",
    "barrier",
    "all_to_all_single",
    "send",
    "recv",
)


@dataclass
class InFlight:
    """The collective the main thread is blocked in."""

    name: str
    ranks: list[int]
    where: str
    t0: float


class BoundedStore:
    """The store's ``set`` / ``get`` / ``check``, each given up after ``timeout_s`` (``TimeoutError``).
    TCPStore's client waits without end on a host that is stopped (SIGSTOP) rather than gone, and
    rank 0's process hosts the store: unbounded, the watchdog of every other rank would block in
    its first read and never name rank 0. Each call runs on a daemon thread; while one has not
    answered, the next fails at once (no thread piles up behind a silent host)."""

    def __init__(self, store: Any, timeout_s: float):
        self.store, self.timeout_s = store, timeout_s
        self._last: threading.Event | None = None

    def _call(self, name: str, *args: Any) -> Any:
        if self._last is not None and not self._last.is_set():
            raise TimeoutError(f"the key-value store has not answered a call for over {self.timeout_s:.0f} s")
        done, box = threading.Event(), {}

        def run() -> None:
            try:
                box["value"] = getattr(self.store, name)(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e
            finally:
                done.set()

        self._last = done
        threading.Thread(target=run, name="torchtitan_clt-watchdog-store", daemon=True).start()
        if not done.wait(self.timeout_s):
            raise TimeoutError(f"the key-value store did not answer {name} in {self.timeout_s:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def set(self, key: str, value: str) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)


def _caller() -> str:
    """``file:line in function`` of the first frame outside torch and this module."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            here = os.path.relpath(name) if not name.startswith("<") else name
            return f"{here}:{f.f_lineno} in {f.f_code.co_name}"
        f = f.f_back
    return "?"


class Watchdog:
    """One per rank (``start_watchdog``); ``training()`` arms it, ``long_phase()`` widens its
    heartbeat window and silences the "still waiting" warning."""

    def __init__(self, rank: int, world: int, train_timeout_s: float, store: Any, prefix: str):
        self.rank, self.world = rank, world
        self.train_timeout_s = float(train_timeout_s)
        self.tick_s = min(max(self.train_timeout_s / 10, 0.2), 5.0)
        self.stale_s = max(3.0, 3 * self.tick_s)
        self.long_stale_s = max(self.stale_s, min(60.0, self.train_timeout_s))
        self.store = BoundedStore(store, store_timeout_s(self.train_timeout_s))
        self.prefix = prefix
        self.inflight: InFlight | None = None
        self._main = threading.main_thread()
        self._depth = 0  # collectives nest (all_gather_object calls all_gather): the outer one counts
        self._training = False
        self._long = 0
        self._beats = 0
        self._warned: float = 0.0
        self._stop = threading.Event()
        self._saved: list[tuple[str, Any]] = []
        self._ranks_of: dict[int, list[int]] = {}
        self._thread = threading.Thread(target=self._run, name="torchtitan_clt-watchdog", daemon=True)

    # ---- phases ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        self._training = True
        try:
            yield
        finally:
            self._training = False

    @contextlib.contextmanager
    def long_phase(self) -> Iterator[None]:
        self._long += 1
        try:
            yield
        finally:
            self._long -= 1

    # ---- collectives -----------------------------------------------------------------------------
    def _ranks(self, group: Any) -> list[int]:
        if group is None:
            return list(range(self.world))
        key = id(group)
        if key not in self._ranks_of:
            self._ranks_of[key] = dist.get_process_group_ranks(group)
        return self._ranks_of[key]

    def _wrap(self, name: str, fn: Any) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._main or self._depth or kwargs.get("async_op"):
                return fn(*args, **kwargs)
            try:
                group = sig.bind(*args, **kwargs).arguments.get("group")
            except TypeError:
                group = None
            self.inflight = InFlight(name, self._ranks(group), _caller(), time.monotonic())
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.inflight = None

        return tracked

    def start(self) -> None:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved.append((name, fn))
                setattr(dist, name, self._wrap(name, fn))
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for name, fn in self._saved:
            setattr(dist, name, fn)
        self._saved.clear()
        # Joined, not left running: a daemon thread inside a store call when the interpreter
        # exits aborts the process (SIGABRT, "terminate called without an active exception").
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.tick_s + 35.0)

    # ---- the thread ------------------------------------------------------------------------------
    def _key(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _beat(self) -> None:
        self._beats += 1
        op = self.inflight
        doing = None if op is None else {"op": op.name, "where": op.where, "waited": time.monotonic() - op.t0}
        self.store.set(self._key(self.rank), json.dumps({"n": self._beats, "doing": doing}))

    def _read(self, ranks: list[int]) -> dict[int, dict | None]:
        """Every rank's last beat (None: unreadable, a silent rank). A store that does not answer
        raises (``TimeoutError``): its host, rank 0, is what stopped."""
        out: dict[int, dict | None] = {}
        for r in ranks:
            try:
                out[r] = (
                    json.loads(self.store.get(self._key(r))) if self.store.check([self._key(r)]) else None
                )
            except TimeoutError:
                raise
            except Exception:  # noqa: BLE001 - an unreadable beat is a silent rank
                out[r] = None
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self._beat()
                op = self.inflight
                if op is None or not self._training:
                    continue
                waited = time.monotonic() - op.t0
                if waited > self.train_timeout_s:
                    self._check(op, waited, long=self._long > 0)
            except Exception as e:  # noqa: BLE001 - the store is gone: the node hosting it is lost
                op = self.inflight
                if op is not None and self._training:
                    waited = time.monotonic() - op.t0
                    if waited > self.train_timeout_s + (self.long_stale_s if self._long else 0.0):
                        self._exit(
                            op,
                            waited,
                            f"rank 0 stopped answering: it hosts the job's key-value store, which does "
                            f"not answer ({type(e).__name__}: {str(e)[:200]}); stopped, frozen or lost",
                        )

    def _check(self, op: InFlight, waited: float, long: bool = False) -> None:
        """Read the other ranks' heartbeats twice, a window apart: exit naming the silent ones;
        otherwise warn (once per timeout, not in a long phase) and go on waiting."""
        stale_s = self.long_stale_s if long else self.stale_s
        others = [r for r in op.ranks if r != self.rank]
        before = self._read(others)
        t_end = time.monotonic() + stale_s
        while time.monotonic() < t_end:  # keep beating: the other ranks are checking us too
            if self._stop.wait(self.tick_s):
                return
            self._beat()
        if self.inflight is not op:  # the collective completed meanwhile
            return
        after = self._read(others)
        silent = [r for r in others if after[r] is None or _n(before[r]) == _n(after[r])]
        if silent:
            what = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}"
            self._exit(
                op,
                waited + stale_s,
                f"{what} stopped answering (no heartbeat for {stale_s:.0f} s: stopped, frozen or lost)",
            )
        busy = [r for r in others if not (after[r] or {}).get("doing")]
        if busy and not long and time.monotonic() - self._warned > self.train_timeout_s:
            self._warned = time.monotonic()
            logger.warning(
                "watchdog: rank %d has waited %.0f s in %s (%s) for rank(s) %s, which answer but are "
                "not in a collective (busy elsewhere: an evaluation, a refill); still waiting",
                self.rank,
                waited,
                op.name,
                op.where,
                busy,
            )

    def _exit(self, op: InFlight, waited: float, why: str) -> None:
        msg = (
            f"Hang: rank {self.rank} waited {waited:.0f} s in {op.name} over ranks {_span(op.ranks)} "
            f"(called from {op.where}), past parallelism.train_timeout_s = {self.train_timeout_s:g}: "
            f"{why}. Exiting with code {exit_codes.HUNG}; the launcher restarts the job from its last "
            "complete checkpoint (MAX_RESTARTS)."
        )
        logger.error(msg)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with contextlib.suppress(OSError), open(error_file, "w") as f:
                json.dump({"message": msg, "timestamp": int(time.time())}, f)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(exit_codes.HUNG)


def _n(beat: dict | None) -> int | None:
    return None if beat is None else beat.get("n")


def _span(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}..{ranks[-1]}"
    return str(ranks)


_CURRENT: Watchdog | None = None


def store_timeout_s(train_timeout_s: float) -> float:
    """How long the watchdog waits for one store call."""
    return max(5.0, min(30.0, train_timeout_s / 2))


def start_watchdog(rank: int, world: int, train_timeout_s: float, prefix: str) -> Watchdog | None:
    """Start this rank's watchdog on torchrun's store (``MASTER_ADDR``/``MASTER_PORT``); None
    without one. Every rank calls it with the same ``prefix`` (fresh per launch)."""
    global _CURRENT
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world <= 1 or not host or not port or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    # A short timeout: the store lives in rank 0's process (tools/launch.py), which may be the
    # one that stopped (and a stopped host is waited for without end: BoundedStore).
    wait = timedelta(seconds=store_timeout_s(train_timeout_s))
    store = dist.TCPStore(host, int(port), is_master=False, timeout=wait, wait_for_workers=False)
    _CURRENT = Watchdog(rank, world, train_timeout_s, store, prefix)
    _CURRENT.start()
    atexit.register(stop_watchdog)  # a worker that never calls distributed.destroy still exits cleanly
    return _CURRENT


def stop_watchdog() -> None:
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.stop()
        _CURRENT = None


# (init_s, train_s, whether NCCL's group timeout may drop to train_s), from init_distributed.
_TIMEOUTS: tuple[float, float, bool] | None = None


def set_timeouts(init_s: float, train_s: float, lower_nccl: bool) -> None:
    global _TIMEOUTS
    _TIMEOUTS = (init_s, train_s, lower_nccl)


@contextlib.contextmanager
def training() -> Iterator[None]:
    """The training loop's timeout for the block: the watchdog armed, and on NCCL the default
    group's timeout lowered to ``train_timeout_s`` (NCCL's watchdog aborts, the flight recorder
    dumps) and raised back after."""
    lower = (
        _TIMEOUTS is not None
        and _TIMEOUTS[2]
        and dist.is_initialized()
        and dist.get_backend() == "nccl"
        and hasattr(dist.distributed_c10d, "_set_pg_timeout")  # private; TorchTitan uses it too
    )
    if lower:
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=_TIMEOUTS[1]))
    try:
        with _CURRENT.training() if _CURRENT is not None else contextlib.nullcontext():
            yield
    finally:
        if lower:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=_TIMEOUTS[0]))


def long_phase() -> contextlib.AbstractContextManager:
    """A block that waits on the file system (checkpoint save / load): no training timeout."""
    return _CURRENT.long_phase() if _CURRENT is not None else contextlib.nullcontext()
