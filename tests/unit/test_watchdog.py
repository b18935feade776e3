"""The hang watchdog's decision on a store of heartbeats (``dist.HashStore``), without processes:
a rank whose heartbeat stops is named with the collective; ranks that keep beating are waited
for; a checkpoint save (long phase) or a collective within the timeout triggers nothing. And the
wrapped collectives record what the main thread waits in (one gloo process)."""

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
    threading.Thread(target=_beat_forever, args=(store, 1, stop), daemon=True).start()
    op = InFlight("barrier", [0, 1], "train.py:9 in step", time.monotonic() - 5)
    dog.inflight = op
    dog._check(op, 5.0)  # returns: rank 1 is alive (in a collective of its own)
    stop.set()
    assert exits == []


def test_only_an_overdue_collective_in_training_is_checked():
    store = dist.HashStore()
    dog, exits = _dog(store, world=2, timeout=0.2)
    dog.tick_s = 0.05
    checked: list[str] = []
    dog._check = lambda op, waited: checked.append(op.name)  # type: ignore[method-assign]
    dog.inflight = InFlight("all_reduce", [0, 1], "x", time.monotonic() - 10)
    dog._thread.start()
    time.sleep(0.3)
    assert checked == []  # not training: init phases keep the process group's long timeout
    with dog.training():
        with dog.long_phase():  # a checkpoint save
            time.sleep(0.3)
            assert checked == []
        deadline = time.monotonic() + 10  # a loaded machine may schedule the thread late
        while not checked and time.monotonic() < deadline:
            time.sleep(0.05)
    dog.stop()
    assert checked and set(checked) == {"all_reduce"}


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
