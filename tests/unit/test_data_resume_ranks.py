"""Stream source resumed on another number of data-parallel ranks: every context exactly once.

Each "rank" is a ``StreamSource`` built in this process with its own ``SourceContext``; states go
from the old ranks to the new ones through ``load_state_dict_from_ranks``, as the checkpoint manager
hands them over. The extractor is replaced by one that writes each row's window tokens and position
into ``x``, so a served row says which context (and which token of it) it is.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import tagged_extract

from torchtitan_clt.config import JobConfig
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data import SourceContext, load_llm
from torchtitan_clt.data.buffer import ShuffleBuffer
from torchtitan_clt.data.pipeline import LLMHandle
from torchtitan_clt.data.source import StreamSource
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import PackedTokens

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SEQ = 16  # 15 rows per window; 2 windows per LLM batch (30 rows); a refill = 2 batches = 60 rows
ROWS = SEQ - 1


@pytest.fixture(scope="module")
def llm():
    return load_llm(str(ASSETS / "tiny_llama"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    # Byte-level test tokenizer: "d00042." is 7 tokens + EOS; every 15-token window holds a whole
    # document number, so a window's tokens name it uniquely.
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"d{i:05d}."}) + "\n" for i in range(3000)))
    return str(path)


def _cfg(text: str, **data) -> JobConfig:
    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), text
    d.seq_len, d.llm_batch_size, d.layers = SEQ, 2, [0, 2]
    d.buffer_tokens, d.buffer_passes, d.prefetch = 60, 1, False
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


def _ranks(cfg, llm, n: int) -> list[StreamSource]:
    out = []
    for r in range(n):
        src = StreamSource(cfg, SourceContext(dp_rank=r, dp_degree=n, seed=7), llm=LLMHandle(*llm))
        src.extractor = tagged_extract
        out.append(src)
    return out


def _rows(x: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row as (window tokens..., position)."""
    return [tuple(r) for r in x[:, 0, : SEQ + 1].long().tolist()]


def _left(src: StreamSource) -> int:
    """Rows still owed by the refills this rank has started or adopted (its passes included)."""
    sd = src.buffer.state_dict()
    return sum(src.buffer.remaining(r) for r in ShuffleBuffer.in_flight(sd, None))


def _run_chain(cfg, llm, chain, finish: bool = True):
    """Segments ``(ranks, batch, steps)``; between segments the states go to the next rank count.
    Returns every row served, over all ranks, and the last segment's sources."""
    served: list[tuple[int, ...]] = []
    srcs: list[StreamSource] = []
    for ranks, batch, steps in chain:
        new = _ranks(cfg, llm, ranks)
        if srcs:
            sds = [s.state_dict() for s in srcs]
            for s in srcs:
                s.close()
            for s in new:
                s.load_state_dict_from_ranks(sds)
        srcs = new
        for _ in range(steps):
            for s in srcs:
                served += _rows(s.next_batch(batch)[0])
    if finish:  # serve what every started refill still owes: then all started refills are whole
        for s in srcs:
            n = _left(s)
            if n:
                served += _rows(s.next_batch(n)[0])
    return served, srcs


def _shard_windows(cfg, llm, shard: int, n: int) -> list[tuple[int, ...]]:
    """The first ``n`` windows of text shard ``shard`` alone (an independent packing of it)."""
    shards = cfg.data.text_shards
    ds = PackedTokens(
        TextSpec(cfg.data.dataset), llm[1], SEQ, dp_rank=shard, dp_degree=shards, num_shards=shards
    )
    return [tuple(w.tolist()) for _, w in zip(range(n), ds)]


def _check_exactly_once(cfg, llm, served, passes: int = 1) -> dict[int, int]:
    """Every row served ``passes`` times, all rows of each context, and per shard the contexts are
    a prefix of that shard's windows (nothing skipped). Returns contexts per shard."""
    counts = Counter(served)
    assert set(counts.values()) == {passes}, Counter(counts.values())
    per_window = Counter(r[:SEQ] for r in counts)
    assert set(per_window.values()) == {ROWS}  # whole contexts only
    shards = cfg.data.text_shards
    seen = set(per_window)
    taken = {}
    for s in range(shards):
        ref = _shard_windows(cfg, llm, s, len(seen) + 1)
        k = sum(w in seen for w in ref)
        assert set(ref[:k]) <= seen and ref[k] not in seen, s  # a prefix of the shard's windows
        taken[s] = k
    assert sum(taken.values()) == len(seen)  # and every context is some shard's
    return taken


@pytest.mark.parametrize("new_ranks", [1, 4])
def test_aligned_resume_equals_uninterrupted(text, llm, new_ranks):
    # 4 shards; every step takes 2 refills a rank on 2 ranks, 4 on 1 rank, 1 on 4 ranks: the data
    # position after each step is the same whatever the rank count, so the rows must be too.
    cfg = _cfg(text, text_shards=4)
    N = 3
    ref, _ = _run_chain(cfg, llm, [(2, 120, 2 * N)], finish=False)
    got, _ = _run_chain(cfg, llm, [(2, 120, N), (new_ranks, 240 // new_ranks, N)], finish=False)
    assert len(got) == len(ref) == 2 * N * 240
    assert Counter(got) == Counter(ref)
    first_half = set(got[: N * 240])
    assert not first_half & set(got[N * 240 :])  # the resumed half is new data, not a replay
    taken = _check_exactly_once(cfg, llm, got)
    assert set(taken.values()) == {2 * N * 4}  # 4 contexts a shard a step


@pytest.mark.parametrize(
    "chain,passes,prefetch",
    [
        ([(2, 50, 3), (1, 70, 4)], 1, False),
        ([(2, 50, 3), (4, 25, 5)], 1, True),  # new ranks 2, 3 adopt nothing
        ([(2, 50, 3), (4, 20, 1), (1, 70, 3)], 1, False),  # saved while draining adopted refills
        ([(2, 45, 4), (1, 70, 3), (3, 40, 3)], 2, True),  # mid-pass, 3 readers of 4 shards
    ],
)
def test_unaligned_resume_serves_each_row_once(text, llm, chain, passes, prefetch):
    cfg = _cfg(text, text_shards=4, buffer_passes=passes, prefetch=prefetch)
    served, last = _run_chain(cfg, llm, chain)
    _check_exactly_once(cfg, llm, served, passes)
    for s in last:
        s.close()


def test_new_ranks_first_finish_the_old_in_flight_refills(text, llm):
    cfg = _cfg(text, text_shards=4)
    old = _ranks(cfg, llm, 2)
    ref = _ranks(cfg, llm, 2)
    for _ in range(3):  # 150 rows a rank: its third refill (rows 120..179) is 30 rows in
        for s in (*old, *ref):
            s.next_batch(50)
    owed = [set(_rows(s.next_batch(30)[0])) for s in ref]  # what the old ranks would serve next
    sds = [s.state_dict() for s in old]
    new = _ranks(cfg, llm, 4)
    for s in new:
        s.load_state_dict_from_ranks(sds)
    assert [len(s.buffer._queue) for s in new] == [1, 1, 0, 0]
    assert set(_rows(new[0].next_batch(30)[0])) == owed[0]
    assert set(_rows(new[1].next_batch(30)[0])) == owed[1]
    one = _ranks(cfg, llm, 1)[0]
    one.load_state_dict_from_ranks(sds)
    assert set(_rows(one.next_batch(60)[0])) == owed[0] | owed[1]


def test_same_rank_resume_while_draining_adopted_refills_is_exact(text, llm):
    cfg = _cfg(text, text_shards=4, buffer_passes=2)
    old = _ranks(cfg, llm, 2)
    for _ in range(3):
        for s in old:
            s.next_batch(45)
    sds = [s.state_dict() for s in old]
    a, b = _ranks(cfg, llm, 1)[0], _ranks(cfg, llm, 1)[0]
    for s in (a, b):
        s.load_state_dict_from_ranks(sds)
    a.next_batch(40)  # inside old rank 0's refill, old rank 1's still queued
    sd = a.state_dict()
    assert sd["buffer"]["origin"] is not None and len(sd["buffer"]["queue"]) == 1
    want = [a.next_batch(70) for _ in range(6)]  # on through the queue into its own shards
    b.load_state_dict(sd)
    for (wx, wy), (gx, gy) in zip(want, [b.next_batch(70) for _ in range(6)]):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)


def test_default_shards_resume_on_fewer_ranks_and_refuse_more(text, llm):
    cfg = _cfg(text)  # text_shards = 0: 2 readers × 1 = 2 shards
    served, srcs = _run_chain(cfg, llm, [(2, 50, 3), (1, 70, 3)])
    assert srcs[0].text_shards == 2
    cfg.data.text_shards = 2  # what the run used, for the reference packing
    _check_exactly_once(cfg, llm, served)
    with pytest.raises(ConfigError, match="data.text_shards"):
        _run_chain(_cfg(text), llm, [(2, 50, 1), (4, 25, 1)])
    with pytest.raises(ConfigError, match="fewer than this run's 4 text readers"):
        _ranks(_cfg(text, text_shards=3), llm, 4)
    old = _ranks(_cfg(text, text_shards=4), llm, 2)
    sds = [s.state_dict() for s in old]
    with pytest.raises(ConfigError, match="set data.text_shards = 4"):
        _ranks(_cfg(text, text_shards=8), llm, 1)[0].load_state_dict_from_ranks(sds)


def test_workers_split_a_readers_shards(text, llm):
    # 2 workers on each of 2 readers: the default is 4 shards, one per worker; resumed on 1 reader
    # with 2 workers, each worker packs 2 shards round-robin.
    cfg = _cfg(text, num_workers=2)
    served, srcs = _run_chain(cfg, llm, [(2, 50, 3), (1, 70, 3)])
    assert srcs[0].text_shards == 4
    cfg.data.text_shards = 4
    _check_exactly_once(cfg, llm, served)
    for s in srcs:
        s.close()
