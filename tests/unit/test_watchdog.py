"""The hang watchdog's decision on a store of heartbeats (``dist.HashStore``), without processes:
a rank whose heartbeat stops is named with the collective; ranks that keep beating are waited
for (without a warning in a checkpoint save, a long phase, whose window is longer); a collective
within the timeout triggers nothing. And the wrapped collectives record what the main thread waits
in (one gloo process)."""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from torchtitan_clt.tools import watchdog as wd
from torchtitan_clt.tools.watchdog import InFlight, Watchdog


class Exited(Exception):
    pass


def _dog(store, rank=0, world=3, timeout=1.0) -> tuple[Watchdog, list[str]]:
    dog = Watchdog(rank, world, timeout, store, prefix="t")
    dog.stale_s = 0.6
    exits: list[str] = []

    def fake_exit(op, waited, why):
        exits.append(f"{op.name} {why}")
        raise Exited

    dog._exit = fake_exit  # type: ignore[method-assign]
    return dog, exits


def _beat_forever(store, rank: int, stop: threading.Event) -> None:
    other = Watchdog(rank, 3, 1.0, store, prefix="t")
    other.inflight = InFlight("all_reduce", [0, 1, 2], "x.py:1 in f", time.monotonic())
    while not stop.wait(0.05):
        other._beat()


def test_silent_rank_is_named_with_the_collective():
    store = dist.HashStore()
    dog, exits = _dog(store)
    stop = threading.Event()
    t = threading.Thread(target=_beat_forever, args=(store, 1, stop), daemon=True)
    t.start()
    Watchdog(2, 3, 1.0, store, prefix="t")._beat()  # rank 2 beat once, then froze
    op = InFlight("all_reduce", [0, 1, 2], "train.py:9 in step", time.monotonic() - 5)
    dog.inflight = op
    try:
        dog._check(op, 5.0)
        raise AssertionError("no exit")
    except Exited:
        pass
    finally:
        stop.set()
    assert exits == ["all_reduce rank 2 stopped answering (no heartbeat for 1 s: stopped, frozen or lost)"]


def test_ranks_that_answer_are_waited_for():
    store = dist.HashStore()
    dog, exits = _dog(store, world=2)
    stop = threading.Event()
    beating = threading.Thread(target=_beat_forever, args=(store, 1, stop), daemon=True)
    beating.start()
    op = InFlight("barrier", [0, 1], "train.py:9 in step", time.monotonic() - 5)
    dog.inflight = op
    dog._check(op, 5.0)  # returns: rank 1 is alive (in a collective of its own)
    stop.set()
    assert exits == []


def test_only_an_overdue_collective_in_training_is_checked():
    store = dist.HashStore()
    dog, exits = _dog(store, world=2, timeout=0.2)
    dog.tick_s = 0.05
    checked: list[tuple[str, bool]] = []
    dog._check = lambda op, waited, long=False: checked.append((op.name, long))  # type: ignore[method-assign]
    dog.inflight = InFlight("all_reduce", [0, 1], "x", time.monotonic() - 10)
    dog._thread.start()
    time.sleep(0.3)
    assert checked == []  # not training: init phases keep the process group's long timeout

    def wait_for_a_check():
        deadline = time.monotonic() + 10  # a loaded machine may schedule the thread late
        while not checked and time.monotonic() < deadline:
            time.sleep(0.05)

    with dog.training():
        with dog.long_phase():  # a checkpoint save: checked too, with the long window
            wait_for_a_check()
            seen_long = set(checked)
            checked.clear()
        wait_for_a_check()
    dog.stop()
    assert seen_long == {("all_reduce", True)}
    assert checked and set(checked) == {("all_reduce", False)}


def test_a_save_waits_for_ranks_that_answer_but_not_for_a_stopped_one(caplog):
    """In a long phase (a checkpoint save) the window is ``long_stale_s``: a rank that keeps
    beating is waited for without the "still waiting" warning (it is writing files); a rank that
    beat once and froze is named, after the long window, not the short one."""
    store = dist.HashStore()
    dog, exits = _dog(store, world=2, timeout=1.0)
    dog.tick_s, dog.long_stale_s = 0.05, 1.0
    stop = threading.Event()
    beating = threading.Thread(target=_beat_forever, args=(store, 1, stop), daemon=True)
    beating.start()
    op = InFlight("barrier", [0, 1], "checkpoint/manager.py:9 in _barrier", time.monotonic() - 5)
    dog.inflight = op
    dog._check(op, 5.0, long=True)
    stop.set()
    beating.join()
    assert exits == [] and "still waiting" not in caplog.text

    Watchdog(1, 2, 1.0, store, prefix="t")._beat()  # rank 1 beats once more, then stops
    t0 = time.monotonic()
    try:
        dog._check(op, 5.0, long=True)
        raise AssertionError("no exit")
    except Exited:
        pass
    assert time.monotonic() - t0 >= 1.0  # the long window, not stale_s = 0.6
    assert exits == ["barrier rank 1 stopped answering (no heartbeat for 1 s: stopped, frozen or lost)"]
    assert Watchdog(0, 2, 300.0, store, prefix="t").long_stale_s == 60.0  # the default's window
    assert Watchdog(0, 2, 4.0, store, prefix="t").long_stale_s == 4.0


def test_wrapped_collectives_record_the_call(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        dog = Watchdog(0, 1, 1.0, dist.HashStore(), prefix="t")
        seen: list = []
        real = dist.all_reduce
        dog._saved = []
        for name in ("all_reduce",):
            dog._saved.append((name, real))
            setattr(dist, name, dog._wrap(name, lambda *a, **k: seen.append(dog.inflight)))
        dist.all_reduce(torch.ones(1), group=dist.group.WORLD)
        dog.stop()
        assert dist.all_reduce is real
        (op,) = seen
        assert op.name == "all_reduce" and op.ranks == [0]
        assert op.where.startswith("tests/unit/test_watchdog.py:") and op.where.endswith(
            "in test_wrapped_collectives_record_the_call"
        )
        assert dog.inflight is None
    finally:
        dist.destroy_process_group()


def test_no_watchdog_without_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert wd.start_watchdog(0, 2, 5.0, "p") is None


def test_timeouts_and_the_deprecated_one(caplog):
    from torchtitan_clt.config.job_config import JobConfig
    from torchtitan_clt.distributed.utils import timeouts

    p = JobConfig().parallelism
    assert timeouts(p) == (1800, 300) and "deprecated" not in caplog.text
    p.init_timeout_s, p.train_timeout_s = 900, 60
    assert timeouts(p) == (900, 60)
    p.timeout_s = 1200  # the old meaning: one timeout for everything
    assert timeouts(p) == (1200, 1200)
    assert "parallelism.timeout_s is deprecated" in caplog.text


class _FrozenStore:
    """A store whose host stopped: every call blocks (as TCPStore's client does on a SIGSTOPped
    host) until the test ends."""

    def __init__(self, store, release: threading.Event):
        self.store, self.release, self.frozen = store, release, False

    def __getattr__(self, name):
        fn = getattr(self.store, name)

        def call(*args):
            if self.frozen:
                self.release.wait()
            return fn(*args)

        return call


def test_a_stopped_store_host_is_named_rank_0():
    """Rank 0 hosts the store: stopped, it answers no call. The watchdog of rank 1, in an overdue
    collective, must still exit naming rank 0 (before, its first read blocked for good)."""
    release = threading.Event()
    store = _FrozenStore(dist.HashStore(), release)
    dog = Watchdog(1, 2, 0.2, store, prefix="t")
    dog.tick_s, dog.store.timeout_s = 0.05, 0.3
    exits: list[str] = []

    def fake_exit(op, waited, why):
        exits.append(why)
        dog._stop.set()

    dog._exit = fake_exit  # type: ignore[method-assign]
    dog._beat()
    store.frozen = True
    dog.inflight = InFlight("all_reduce", [0, 1], "x.py:1 in f", time.monotonic() - 10)
    dog._training = True
    t0 = time.monotonic()
    dog._thread.start()
    dog._thread.join(timeout=30)
    release.set()
    assert exits and exits[0].startswith("rank 0 stopped answering: it hosts the job's key-value store"), (
        exits
    )
    assert "TimeoutError" in exits[0] and time.monotonic() - t0 < 10
