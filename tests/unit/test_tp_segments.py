"""``SegmentExchange`` (distributed/tensor_parallel.py): MOLT's gates move between the contiguous
block of each tp rank and the rank's share of every group of transforms, exactly, with the
gradient moved back; and a MOLT whose group counts do not split over tp stops with a message.

Three gloo ranks, segments [3, 6, 9] (N = 18, blocks of 6): the block of rank 1 holds the end of
segment 1 and the start of segment 2, so every rank sends to and receives from the others. The
reference is the whole tensor indexed by hand on one rank.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import run_ranks, tiny_args

SEGMENTS = [3, 6, 9]
WORLD = 3


def _worker(rank: int, store: str) -> None:
    import torch.distributed as dist

    from torchtitan_clt.distributed.tensor_parallel import segment_exchanges

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        N, n = sum(SEGMENTS), sum(SEGMENTS) // WORLD
        full = torch.randn(4, 2, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        weight = torch.randn(4, 2, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        # Rank r's share: the r-th third of every segment, in segment order (worked by hand).
        shares = {0: [0, 3, 4, 9, 10, 11], 1: [1, 5, 6, 12, 13, 14], 2: [2, 7, 8, 15, 16, 17]}
        there, back = segment_exchanges(SEGMENTS, rank, WORLD, dist.group.WORLD)

        x = full[..., rank * n : (rank + 1) * n].clone().requires_grad_(True)
        moved = there(x)
        assert torch.equal(moved, full[..., shares[rank]]), rank
        assert torch.equal(back(moved), x), rank  # and back again
        mask = full[..., rank * n : (rank + 1) * n] > 0
        assert torch.equal(there(mask), full[..., shares[rank]] > 0)

        # Gradient: d/dx of Σ_r <weight at rank r's share, share> is weight at x's own block.
        (moved * weight[..., shares[rank]]).sum().backward()
        assert torch.equal(x.grad, weight[..., rank * n : (rank + 1) * n]), rank
        # Norms [L, n] from the shares back to the blocks, gradient included.
        norms = full[0, :, shares[rank]].clone().requires_grad_(True)
        block = back(norms)
        assert torch.equal(block, full[0, :, rank * n : (rank + 1) * n])
        (block * weight[0, :, rank * n : (rank + 1) * n]).sum().backward()
        assert torch.equal(norms.grad, weight[0, :, shares[rank]])

        # A MOLT whose group counts do not split over tp says which setting to change.
        from torch.distributed.device_mesh import init_device_mesh

        from torchtitan_clt.distributed.tensor_parallel import apply_tp
        from torchtitan_clt.models.molt import MOLT_TP_PLAN
        from torchtitan_clt.protocols import model_registry

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        with torch.device("meta"):
            model = model_registry.get("molt").build_fn(
                tiny_args("molt", "jumprelu", extra={"molt_ranks": [2, 1], "molt_counts": [4, 5]})
            )
        try:
            apply_tp(model, mesh, MOLT_TP_PLAN)
        except ValueError as e:
            assert "model.molt_counts" in str(e) and "[4, 5]" in str(e), e
        else:
            raise AssertionError("counts [4, 5] on tp = 3 were accepted")
    finally:
        dist.destroy_process_group()


def test_segment_exchange_is_exact_with_its_gradient(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("needs torch.distributed")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_ranks(_worker, (str(tmp_path / "store"),), WORLD, timeout_s=120)
