"""The cache source under tensor parallelism: a data-parallel rank's blocks are dealt over its TP
ranks, each block read by one rank only (counted) and broadcast; the group serves exactly what one
rank without TP serves (same sequence, same seed), resumes exactly on the same mesh and on tp=1.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks

from torchtitan_clt.config import JobConfig
from torchtitan_clt.data import SourceContext, load_llm, write_activation_cache
from torchtitan_clt.data.cache import CacheBlocks, read_meta
from torchtitan_clt.data.pipeline import LLMHandle
from torchtitan_clt.protocols import data_source_registry

ASSETS = Path(__file__).resolve().parents[1] / "assets"
_STATE: dict = {}


def _cfg(**data) -> JobConfig:
    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), str(ASSETS / "tiny_text.txt")
    d.seq_len, d.llm_batch_size, d.layers = 9, 2, [0, 2, 3]  # a block is 2 × 8 = 16 rows
    d.source, d.cache_dir = "cache", _STATE.get("cache", "")
    d.buffer_tokens, d.buffer_passes, d.prefetch = 40, 2, True  # a refill: 3 blocks, 48 rows
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


def _source(tp: bool):
    group = dist.group.WORLD if tp else None
    return data_source_registry.get("cache")(_cfg(), SourceContext(tp_group=group, seed=4))


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=2)
    try:
        reads: list[int] = []
        read = CacheBlocks.read

        def counted(self, block):
            reads.append(block)
            return read(self, block)

        CacheBlocks.read = counted
        src = _source(tp=True)
        served = [src.next_batch(30) for _ in range(6)]  # 180 rows: refills A, B (2 passes of 48)
        sd = src.state_dict()
        then = [src.next_batch(30) for _ in range(3)]  # into refill C; D prefetched
        src.close()  # under TP the prefetch in flight is finished, so the reads are whole refills
        counted_reads = list(reads)
        resumed = _source(tp=True)
        resumed.load_state_dict(sd)
        again = [resumed.next_batch(30) for _ in range(3)]
        resumed.close()
        out = {"served": served, "then": then, "again": again, "sd": sd, "reads": counted_reads}
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    llm = load_llm(str(ASSETS / "tiny_llama"))
    folder = tmp_path_factory.mktemp("tpcache") / "c"
    write_activation_cache(_cfg(), folder, 200, 32, "float32", llm=LLMHandle(*llm))  # 13 blocks
    _STATE["cache"] = str(folder)
    yield folder
    _STATE.clear()


@pytest.mark.slow
def test_cache_tp_reads_each_block_once_and_serves_the_tp1_batches(cache, tmp_path):
    run_ranks(_worker, (str(tmp_path),), 2, start_method="fork")
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # Reads: refills A, B, C, D of 3 blocks are positions 0..11 of the seeded order; position g is
    # read by TP rank g % 2 alone (A deals from rank 0, B from 1, C from 0, D from 1).
    order = CacheBlocks(cache, read_meta(cache), [0, 1, 2], seed=4)
    for rank in range(2):
        assert out[rank]["reads"] == [order.block_at(g) for g in range(12) if g % 2 == rank]
    both = Counter(out[0]["reads"] + out[1]["reads"])
    assert set(both.values()) == {1} and len(both) == 12

    # The group serves what one rank without TP serves, batch for batch.
    one = _source(tp=False)
    want = [one.next_batch(30) for _ in range(9)]
    one.close()
    for o in out:
        for (wx, wy), (gx, gy) in zip(want, o["served"] + o["then"]):
            assert torch.equal(wx, gx) and torch.equal(wy, gy)
        for (wx, wy), (gx, gy) in zip(o["then"], o["again"]):  # same-mesh resume
            assert torch.equal(wx, gx) and torch.equal(wy, gy)

    # tp=2 -> tp=1: the adopted refill, then the own sequence from where the group's ended.
    one = _source(tp=False)
    one.load_state_dict_from_ranks([out[1]["sd"], out[0]["sd"]])
    for (wx, wy), (gx, gy) in zip(want[6:], [one.next_batch(30) for _ in range(3)]):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    more = one.next_batch(100)[0]
    one.close()
    ref = _source(tp=False)
    for _ in range(9):
        ref.next_batch(30)
    assert torch.equal(more, ref.next_batch(100)[0])  # on through refills D, E as if uninterrupted
    ref.close()
