"""The shared-memory collectives FSDP2 uses on one host equal gloo's own all-gather /
reduce-scatter (2 and 3 ranks, SUM and AVG, calls reusing one segment), a fully_shard module
given them trains to the same weights as with the native collectives while no byte goes through
a socket, nothing is left in the segment folder, and every rank falls back together (to the rings)
when one rank cannot map the segment or there is no room for it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import fsdp_toy_weights

from torchtitan_clt.distributed import shm_comm

CPU = torch.device("cpu")


def _collectives_match_gloo(rank: int, world: int) -> None:
    group = dist.new_group(list(range(world)))
    shared = shm_comm._Shared(group)  # one segment for both, as for an FSDP unit
    ag = shm_comm.ShmAllGather(shared, shm_comm._gloo_all_gather)
    rs = shm_comm.ShmReduceScatter(shared, shm_comm._gloo_reduce_scatter)
    g = torch.Generator().manual_seed(rank)
    n = 777
    for call in range(3):  # the same segments, refilled: stale data from a call must not leak
        shard = torch.randn(n, generator=g, dtype=torch.float64)
        ref = torch.empty(world * n, dtype=torch.float64)
        dist.all_gather_into_tensor(ref, shard)
        out = ag.allocate((world * n,), dtype=torch.float64, device=CPU)
        out.view(world, n)[rank].copy_(shard)  # FSDP2's copy-in
        assert ag(out, out.view(world, n)[rank], group) is None
        assert ag.shared.holds(out, group)
        assert torch.equal(out, ref)

        full = torch.randn(world * n, generator=g, dtype=torch.float64)
        op = dist.ReduceOp.AVG if call % 2 else dist.ReduceOp.SUM
        ref_out = torch.empty(n, dtype=torch.float64)
        dist.reduce_scatter_tensor(ref_out, full.clone(), op=op)
        inp = rs.allocate((world * n,), dtype=torch.float64, device=CPU)
        inp.copy_(full)
        mine = rs.allocate((n,), dtype=torch.float64, device=CPU)
        assert rs.shared.holds(inp, group) and not rs.shared.holds(mine, group)
        assert inp.data_ptr() == shared.seg[rank].data_ptr()  # row r; rank 0's is the gather's row
        assert rs(mine, inp, group, op) is None
        torch.testing.assert_close(mine, ref_out, rtol=1e-14, atol=1e-14)


def _worker(rank: int, world: int, store: str, shm_dir: str, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        shm_comm.SHM_DIR = shm_dir
        if case == "match":
            _collectives_match_gloo(rank, world)
            native, _ = fsdp_toy_weights(rank, world, "native")
            shared, calls = fsdp_toy_weights(rank, world, "shm")
            # the shared path ran: barriers only, no point-to-point (rings) and no gloo collective
            assert calls.get("barrier", 0) >= 4 and not calls.get("isend")
            assert not calls.get("all_gather_into_tensor") and not calls.get("reduce_scatter_tensor")
        else:
            if case == "one_rank_blind" and rank == world - 1:
                shm_comm._visible = lambda _name: False  # this rank is on "another host"
            if case == "no_room":

                def full(*_a):
                    raise OSError(28, "No space left on device")

                shm_comm._reserve = full
            native, _ = fsdp_toy_weights(rank, world, "native")
            shared, calls = fsdp_toy_weights(rank, world, "shm")
            assert calls.get("isend", 0) > 0  # every rank fell back to the rings, none hangs
        for a, b in zip(native, shared):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        dist.barrier()
        mine = f"torchtitan_clt_{os.getpid()}_"  # rank 0 names the segments it makes
        leftovers = [f for f in os.listdir(shm_dir) if f.startswith(mine)]
        assert not leftovers, leftovers  # unlinked once mapped (or never made)
    finally:
        dist.destroy_process_group()


def _skip_without_api():
    if shm_comm.AllGather is None:
        pytest.skip("this torch has no FSDP2 custom collectives")


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_match_gloo(world, tmp_path):
    """2 ranks in ``/dev/shm`` itself (what a CPU job uses), 3 in a folder of the test's own."""
    _skip_without_api()
    seg_dir = tmp_path / "shm"
    seg_dir.mkdir()
    where = "/dev/shm" if world == 2 and os.path.isdir("/dev/shm") else str(seg_dir)
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), where, "match"), nprocs=world, join=True)


@pytest.mark.parametrize("case", ["one_rank_blind", "no_room"])
def test_shared_memory_falls_back_together(case, tmp_path):
    _skip_without_api()
    seg_dir = tmp_path / "shm"
    seg_dir.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(seg_dir), case), nprocs=2, join=True)
