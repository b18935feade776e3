"""TopK keeps exactly k per token and layer on every layout, ties to the lowest feature id.

Pre-activations rounded to a few integer values tie at the k-th value in almost every row (what
bf16 does at scale). One process picks the k largest with ties broken by the lowest feature id,
on both backends (checked against a hand-built reference: a stable sort by value, descending).
On a gloo group of 2 or 4 ranks, each holding its block of features in rank order (tensor
parallelism), the ranks' picks must be exactly the one-process picks: k per row in total. The
old rule (keep every tie at the threshold) kept up to F/tp ties per rank and fails here.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import free_port, run_ranks

N, L, F, K = 12, 3, 16, 5


def _h() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(-2, 4, (N, L, F), generator=g).float()  # 6 values over 16 features: ties


def _reference(h: torch.Tensor, k: int, positive: bool) -> torch.Tensor:
    """``[N, L, F]`` bool: the k largest per row, ties to the lowest id (a stable descending sort)."""
    order = torch.sort(-h, dim=-1, stable=True).indices[..., :k]
    keep = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, order, True)
    return keep & (h > 0) if positive else keep


def _mask(idx: torch.Tensor, f: int, offset: int = 0, total: int | None = None) -> torch.Tensor:
    total = f if total is None else total
    m = torch.zeros(*idx.shape[:2], total + 1, dtype=torch.bool)
    return m.scatter_(-1, torch.where(idx >= 0, idx + offset, total), True)[..., :total]


def test_ties_are_planted():
    h = _h()
    kth = h.topk(K, dim=-1).values[..., -1:]
    assert ((h == kth).sum(-1) > (h.topk(K, dim=-1).values == kth).sum(-1)).float().mean() > 0.5


@pytest.mark.parametrize("positive", [False, True])
def test_one_process_takes_lowest_ids(backend, positive):
    from torchtitan_clt.kernels.selection import Selection, select

    h = _h()
    idx, _ = select(h, Selection("topk", K, positive=positive), backend=backend)
    assert torch.equal(_mask(idx, F), _reference(h, K, positive))
    if not positive:
        assert bool((idx >= 0).sum(-1).eq(K).all())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from torchtitan_clt.kernels.selection import Selection, select

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        h = _h()
        f_local = F // world
        for positive in (False, True):
            mine = h[..., rank * f_local : (rank + 1) * f_local].contiguous()
            idx, _ = select(
                mine, Selection("topk", K, positive=positive), backend="torch", group=dist.group.WORLD
            )
            part = _mask(idx, f_local, rank * f_local, F)
            parts = [torch.zeros_like(part, dtype=torch.int32) for _ in range(world)]
            dist.all_gather(parts, part.to(torch.int32))
            union = torch.stack(parts).sum(0)
            assert int(union.max()) <= 1, "two ranks kept the same feature"
            assert torch.equal(union.bool(), _reference(h, K, positive)), f"rank {rank} positive={positive}"
        open(os.path.join(out, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_takes_exactly_the_one_process_picks(tmp_path, world):
    run_ranks(_worker, (world, free_port(), str(tmp_path)), world, timeout_s=120)
    assert sorted(os.listdir(tmp_path)) == [f"ok{r}" for r in range(world)]
