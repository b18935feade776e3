"""Tensor-parallel buffer refills dealt chunk by chunk: the capacity is ``buffer_tokens`` rounded up
to one chunk at tp 1, 2 and 4; no rank receives more than one bounded piece of gathered rows at a
time (no all-gather); the group serves identical batches, every context once, prefetch on or off;
resume is exact on the same mesh and from tp=2 onto tp=4 and tp=1.

Multi-process on gloo (fork). As in test_data_resume_ranks, the extractor is replaced by one that
writes each row's window tokens and position into ``x``, so a served row says which context it is.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks, tagged_extract

from torchtitan_clt.config import JobConfig
from torchtitan_clt.data import SourceContext, load_llm
from torchtitan_clt.data.pipeline import LLMHandle
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import PackedTokens

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SEQ = 16  # 15 rows a context, 2 contexts an LLM batch: a chunk is 30 rows
ROWS = SEQ - 1
CHUNK = 2 * ROWS
TOKENS = 50  # buffer_tokens: a refill is 2 chunks, 60 rows, on every layout
PIECE_ROWS = 7  # broadcast pieces of 7 rows (x rows are 2 × 64 fp32)
_STATE: dict = {}  # the LLM and the text, set in the parent before the workers fork


def _cfg(**data) -> JobConfig:
    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), _STATE["text"]
    d.seq_len, d.llm_batch_size, d.layers = SEQ, 2, [0, 2]
    d.buffer_tokens, d.buffer_passes, d.prefetch = TOKENS, 1, True
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


def _source(cfg: JobConfig, tp: bool = True, **ctx):
    from torchtitan_clt.data.source import StreamSource

    group = dist.group.WORLD if tp and dist.is_initialized() else None
    src = StreamSource(cfg, SourceContext(tp_group=group, seed=3, **ctx), llm=LLMHandle(*_STATE["llm"]))
    src.extractor = tagged_extract
    return src


def _rows(x: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(r) for r in x[:, 0, : SEQ + 1].long().tolist()]


class _Spy:
    """Counts what the collectives carry: the largest piece of rows a rank received by broadcast,
    and any all-gather."""

    def __init__(self, events: list[str] | None = None):
        self.largest, self.pieces, self.gathers = 0, 0, 0
        self.events = events if events is not None else []  # "recv" for each piece received
        self._broadcast, self._gather = dist.broadcast, dist.all_gather

    def broadcast(self, tensor, *args, group=None, group_src=None, **kw):
        if tensor.dim() == 3 and group_src != dist.get_rank(group):
            self.largest, self.pieces = max(self.largest, tensor.shape[0]), self.pieces + 1
            self.events.append("recv")
        return self._broadcast(tensor, *args, group=group, group_src=group_src, **kw)

    def all_gather(self, *args, **kw):
        self.gathers += 1
        return self._gather(*args, **kw)


def _serve(rank: int, world: int) -> dict:
    from torchtitan_clt.data import buffer

    spy = _Spy()
    dist.broadcast, dist.all_gather = spy.broadcast, spy.all_gather
    buffer.PIECE_BYTES = PIECE_ROWS * 2 * 64 * 4
    ahead, plain = _source(_cfg()), _source(_cfg(prefetch=False))
    # Alternately: the prefetch thread's broadcasts run beside the training thread's (own groups).
    got = []
    for _ in range(9):  # 3 refills of 60
        got.append((ahead.next_batch(20), plain.next_batch(20)))
        if dist.is_initialized():  # a training collective on the training group meanwhile
            dist.all_reduce(torch.ones(3))
    slots = [
        (s.x.shape[0], s.y.shape[0]) for src in (ahead, plain) for s in src.buffer._slots if s.x is not None
    ]
    sd = ahead.state_dict()
    want = [ahead.next_batch(50) for _ in range(2)]
    resumed = _source(_cfg())
    resumed.load_state_dict(sd)
    again = [resumed.next_batch(50) for _ in range(2)]
    for s in (ahead, plain, resumed):
        s.close()
    return {
        "ahead": [a for a, _ in got],
        "plain": [p for _, p in got],
        "slots": slots,
        "resume": (want, again),
        "spy": (spy.largest, spy.pieces, spy.gathers),
    }


def _save_tp2(rank: int, world: int) -> dict:
    """80 rows (20 into the second refill) on a tp=2 group, its states, then what it serves next."""
    src = _source(_cfg(text_shards=4))
    served = [src.next_batch(20)[0] for _ in range(4)]
    sd = src.state_dict()
    owed, then = src.next_batch(40)[0], src.next_batch(60)[0]
    src.close()
    return {"served": served, "sd": sd, "owed": owed, "then": then}


def _load_tp4(rank: int, world: int) -> dict:
    sds = [torch.load(p, weights_only=False)["sd"] for p in sorted(Path(_STATE["folder"]).glob("save*.pt"))]
    src = _source(_cfg(text_shards=4))
    src.load_state_dict_from_ranks(sds)
    owed, then = src.next_batch(40)[0], src.next_batch(60)[0]
    src.close()
    return {"owed": owed, "then": then}


def _fail(rank: int, world: int) -> dict:
    """Rank 1's extraction fails on its second chunk: both ranks stop, none waits forever."""
    src = _source(_cfg(prefetch=False))
    calls = []

    def extract(tokens):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ValueError("broken batch")
        return tagged_extract(tokens)

    src.extractor = extract
    try:
        for _ in range(6):
            src.next_batch(30)
    except Exception as e:  # noqa: BLE001 - what each rank saw is the result
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def _order(rank: int, world: int) -> dict:
    """What a rank does during the first refill, in order: ``extract`` (its own chunk) or ``recv``
    (a piece of another's)."""
    from torchtitan_clt.data import buffer

    events: list[str] = []
    dist.broadcast = _Spy(events).broadcast
    buffer.PIECE_BYTES = PIECE_ROWS * 2 * 64 * 4
    src = _source(_cfg(prefetch=False))
    src.extractor = lambda t: (events.append("extract"), tagged_extract(t))[1]
    src.next_batch(1)  # the first refill: 2 chunks, from ranks 0 and 1
    src.close()
    return {"events": events}


JOBS = {"serve": _serve, "save": _save_tp2, "load": _load_tp4, "fail": _fail, "order": _order}


def _worker(rank: int, world: int, job: str) -> None:
    torch.set_num_threads(1)
    folder = _STATE["folder"]
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rdv_{job}{world}", rank=rank, world_size=world
    )
    try:
        torch.save(JOBS[job](rank, world), f"{folder}/{job}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _launch(job: str, world: int) -> list[dict]:
    if world == 1:
        return [JOBS[job](0, 1)]
    run_ranks(_worker, (world, job), world, start_method="fork")
    return [torch.load(Path(_STATE["folder"]) / f"{job}{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", autouse=True)
def state(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tpchunks")
    text = folder / "docs.jsonl"  # "d00042." is 7 byte tokens + EOS: a window names its documents
    text.write_text("".join(json.dumps({"text": f"d{i:05d}."}) + "\n" for i in range(3000)))
    _STATE.update(llm=load_llm(str(ASSETS / "tiny_llama")), text=str(text), folder=str(folder))
    yield
    _STATE.clear()


def _windows(shard: int, shards: int, n: int) -> list[tuple[int, ...]]:
    """The first ``n`` windows of text shard ``shard`` of ``shards`` alone (its own packing)."""
    ds = PackedTokens(
        TextSpec(_STATE["text"]), _STATE["llm"][1], SEQ, dp_rank=shard, dp_degree=shards, num_shards=shards
    )
    return [tuple(w.tolist()) for _, w in zip(range(n), ds)]


def _contexts_per_shard(served: list[tuple[int, ...]], shards: int) -> list[int]:
    """Every row once, whole contexts only, and per shard a prefix of its windows: their counts."""
    counts = Counter(served)
    assert set(counts.values()) == {1}, Counter(counts.values())
    per_window = Counter(r[:SEQ] for r in counts)
    assert set(per_window.values()) == {ROWS}
    seen, taken = set(per_window), []
    for s in range(shards):
        ref = _windows(s, shards, len(seen) + 1)
        k = sum(w in seen for w in ref)
        assert set(ref[:k]) <= seen and ref[k] not in seen, s
        taken.append(k)
    assert sum(taken) == len(seen)
    return taken


# Contexts each reader extracted in 3 refills of 2 chunks (2 contexts each), dealt round-robin with
# the first rank rotating by 2 chunks a refill: tp=4 deals (0, 1), (2, 3), (0, 1).
DEALT = {1: [12], 2: [6, 6], 4: [4, 4, 2, 2]}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_capacity_pieces_once_and_prefetch(tp):
    out = _launch("serve", tp)
    for o in out:
        # Allocated rows: 50 rounded up to one chunk (<= 50 + 30 - 1) on every layout, both slots.
        assert o["slots"] and set(o["slots"]) == {(60, 60)}, o["slots"]
        largest, pieces, gathers = o["spy"]
        assert gathers == 0
        if tp > 1:  # others' chunks arrive by pieces of at most PIECE_ROWS rows, never whole
            assert 0 < largest <= PIECE_ROWS and pieces >= 3 * (CHUNK // PIECE_ROWS), o["spy"]
        for (ax, ay), (px, py) in zip(o["ahead"], o["plain"]):  # prefetch on == off
            assert torch.equal(ax, px) and torch.equal(ay, py)
            torch.testing.assert_close(ay, -ax)
        for (wx, wy), (gx, gy) in zip(*o["resume"]):  # same-mesh resume, the deal replayed
            assert torch.equal(wx, gx) and torch.equal(wy, gy)
    for o in out[1:]:  # the group serves identical batches
        for (x0, y0), (x1, y1) in zip(out[0]["ahead"], o["ahead"]):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    served = [r for x, _ in out[0]["ahead"] for r in _rows(x)]
    assert _contexts_per_shard(served, tp) == DEALT[tp]  # each reader's own contexts, once each


@pytest.mark.slow
def test_tp2_resumes_on_tp4_and_tp1_exactly():
    old = _launch("save", 2)
    for o in old[1:]:
        assert all(torch.equal(a, b) for a, b in zip(old[0]["served"], o["served"]))
    assert old[0]["sd"]["buffer"]["first"] == 0 and old[0]["sd"]["buffer"]["rows"] == 60
    served = [r for x in old[0]["served"] for r in _rows(x)]
    new = _launch("load", 4)
    for o in new:  # the adopted refill: the rows the tp=2 group owed, in its order
        assert torch.equal(o["owed"], old[0]["owed"])
        assert torch.equal(o["then"], new[0]["then"])
    one = _source(_cfg(text_shards=4), tp=False)
    one.load_state_dict_from_ranks([o["sd"] for o in reversed(old)])
    assert torch.equal(one.next_batch(40)[0], old[0]["owed"])
    then_one = one.next_batch(60)[0]
    one.close()
    # 2 old refills, then 1 new one, each context once: the old group's readers 0, 1 (shards 0, 2
    # and 1, 3) 4 contexts each; then tp=4 readers 0, 1 (shards 0, 1) 2 each, or the one reader 4
    # (the shards round-robin).
    for then, want in ((new[0]["then"], [4, 4, 2, 2]), (then_one, [3, 3, 3, 3])):
        assert _contexts_per_shard(served + _rows(old[0]["owed"]) + _rows(then), 4) == want


@pytest.mark.slow
def test_a_failed_chunk_stops_the_whole_group():
    out = _launch("fail", 2)
    assert out[1]["error"] == "ValueError: broken batch"
    assert out[0]["error"].startswith("RuntimeError: Tensor-parallel rank 1 could not extract its chunk")


@pytest.mark.slow
def test_the_owners_of_a_refill_extract_at_the_same_time():
    # tp=4, a refill of 2 chunks dealt to ranks 0, 1: rank 1 extracts its chunk before chunk 0
    # arrives (not after); ranks 2 and 3 only receive. Pieces: 5 of x and 5 of y per chunk.
    out = [o["events"] for o in _launch("order", 4)]
    assert out[0] == ["extract"] + ["recv"] * 10
    assert out[1] == ["extract"] + ["recv"] * 10
    assert out[2] == out[3] == ["recv"] * 20
