"""The gloo ring collectives FSDP2 uses on CPU equal gloo's own all-gather / reduce-scatter
(2 and 3 ranks, SUM and AVG, sizes that split into several pieces), and a fully_shard module
given them trains to the same weights as with the native collectives while only the rings run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import fsdp_toy_weights

from torchtitan_clt.distributed import ring_comm


def _worker(rank: int, world: int, store: str) -> None:
    # a file store: no TCP port to race other processes for
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ring_comm._PIECE_BYTES = 1000  # several pieces per chunk
        g = torch.Generator().manual_seed(rank)
        n = 777
        shard = torch.randn(n, generator=g, dtype=torch.float64)
        ref = torch.empty(world * n, dtype=torch.float64)
        dist.all_gather_into_tensor(ref, shard)
        out = torch.full((world * n,), float("nan"), dtype=torch.float64)
        ring_comm.ring_all_gather(out, shard, None)
        assert torch.equal(out, ref)

        full = torch.randn(world * n, generator=g, dtype=torch.float64)
        for average in (False, True):
            ref_out = torch.empty(n, dtype=torch.float64)
            dist.reduce_scatter_tensor(
                ref_out, full.clone(), op=dist.ReduceOp.AVG if average else dist.ReduceOp.SUM
            )
            mine = torch.empty(n, dtype=torch.float64)
            ring_comm.ring_reduce_scatter(mine, full.clone(), None, average=average)
            torch.testing.assert_close(mine, ref_out, rtol=1e-14, atol=1e-14)

        # fully_shard with and without the rings: same weights after two optimizer steps; the
        # rings ran (CommTimer counts dist.isend, which only they call), and only when asked.
        native, calls = fsdp_toy_weights(rank, world, "native", steps=2)
        assert not calls.get("isend")
        ring, calls = fsdp_toy_weights(rank, world, "ring", steps=2)
        assert calls.get("isend", 0) > 0
        for a, b in zip(native, ring):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        # both ranks done before either tears its pairs down (a rank exiting while its peer's
        # last transfer is still closing is a teardown race gloo can report as an error)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ring_collectives_match_gloo(world, tmp_path):
    if ring_comm.AllGather is None:
        pytest.skip("this torch has no FSDP2 custom collectives")
    mp.spawn(_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)
