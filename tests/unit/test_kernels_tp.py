"""Selection over ranks: two gloo ranks, each holding half of every layer's features (tensor
parallel) or half of the rows (data parallel), give the single-process BatchTopK threshold, the
TopK / BatchTopK selection, and the sparse step's loss and gradients (torch and Triton paths)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from torchtitan_clt.kernels.backend import has_triton


def _weights(n_layers, f, d):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(n_layers, f, d, generator=g),
        torch.randn(n_layers, f, generator=g) * 0.3,
        *[torch.randn(f, n_layers - s, d, generator=g) for s in range(n_layers)],
        torch.randn(n_layers, d, generator=g),
    ]


def _mask(idx: torch.Tensor, f: int) -> torch.Tensor:
    """``[N, L, f]`` bool: which features ``idx`` keeps."""
    m = torch.zeros(*idx.shape[:2], f + 1, dtype=torch.bool)
    return m.scatter_(-1, torch.where(idx >= 0, idx, f), True)[..., :f]


def _worker(rank: int, world: int, port: int, backend: str, scope: str) -> None:
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    from torchtitan_clt.kernels.selection import Selection, select
    from torchtitan_clt.kernels.sparse_step import clt_sparse_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n, n_layers, f, d, k = 6, 3, 16, 4, 2
        ws = _weights(n_layers, f, d)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(n, n_layers, d, generator=g), torch.randn(n, n_layers, d, generator=g)
        full = [w.clone().requires_grad_(True) for w in ws]
        loss_ref, _ = clt_sparse_loss(
            x,
            y,
            full[0],
            full[1],
            full[2:-1],
            full[-1],
            k,
            scope,
            0.2,
            backend=backend,
            density_threshold=1.0,
        )
        loss_ref.backward()
        fs = slice(rank * f // world, (rank + 1) * f // world)  # this rank's features
        mine = [ws[0][:, fs], ws[1][:, fs], *[w[fs] for w in ws[2:-1]], ws[-1]]
        mine = [w.clone().requires_grad_(True) for w in mine]
        loss, _ = clt_sparse_loss(
            x,
            y,
            mine[0],
            mine[1],
            mine[2:-1],
            mine[-1],
            k,
            scope,
            0.2,
            backend=backend,
            density_threshold=1.0,
            tp_group=dist.group.WORLD,
        )
        loss.backward()
        assert torch.allclose(loss, loss_ref, rtol=1e-5), (loss.item(), loss_ref.item())
        ref_grads = [
            full[0].grad[:, fs],
            full[1].grad[:, fs],
            *[w.grad[fs] for w in full[2:-1]],
            full[-1].grad,
        ]
        for a, b in zip(mine, ref_grads):
            assert torch.allclose(a.grad, b, rtol=1e-4, atol=1e-5)
        h = torch.einsum("nld,lfd->nlf", x, ws[0]) + ws[1]
        rs = slice(rank * n // world, (rank + 1) * n // world)  # this rank's rows (data parallel)
        for sel in (Selection("batchtopk", k, scope), Selection("topk", k)):
            idx_ref, tau_ref = select(h, sel, backend="torch")
            ref = _mask(idx_ref, f)
            idx, tau = select(h[:, :, fs].contiguous(), sel, backend, group=dist.group.WORLD)
            assert torch.equal(_mask(idx, f // world), ref[:, :, fs]), sel
            if sel.kind == "batchtopk":
                assert torch.equal(tau, tau_ref)
                idx, tau = select(h[rs].contiguous(), sel, backend, group=dist.group.WORLD, batch_scale=world)
                assert torch.equal(_mask(idx, f), ref[rs]), sel
                assert torch.equal(tau, tau_ref)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))],
)
@pytest.mark.parametrize("scope", ["layer", "all"])
def test_feature_sharded_step_matches_single_process(backend, scope):
    mp.spawn(_worker, args=(2, free_port(), backend, scope), nprocs=2, join=True)
