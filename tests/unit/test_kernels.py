"""Kernel ops: Triton (under TRITON_INTERPRET=1 on CPU) and the torch fallback, each against the
other and against float64 dense references; forward and every gradient; ragged rows and empty rows.

Shapes stay tiny: the Triton interpreter runs each program in Python.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.backend import has_triton


def _dense(idx: torch.Tensor, vals: torch.Tensor, n_features: int) -> torch.Tensor:
    """[..., K] sparse -> [..., F] dense, float64, differentiable in vals."""
    out = torch.zeros(*idx.shape[:-1], n_features, dtype=vals.dtype)
    return out.scatter_add(-1, idx.clamp(min=0), torch.where(idx >= 0, vals, torch.zeros_like(vals)))


def _ragged_sparse(n, k, n_features, gen, empty_rows=(1,)):
    """idx [n, k] with a different count per row (rows in empty_rows have none), -1 padded."""
    idx = torch.full((n, k), -1, dtype=torch.long)
    for r in range(n):
        c = 0 if r in empty_rows else int(torch.randint(1, k + 1, (1,), generator=gen))
        idx[r, :c] = torch.randperm(n_features, generator=gen)[:c].sort().values
    vals = torch.randn(n, k, generator=gen) * (idx >= 0)
    return idx, vals


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize("n,m,k", [(5, 37, 4), (3, 16, 1), (2, 9, 9), (4, 1500, 7)])
def test_topk_matches_sorted_reference(backend, n, m, k):
    g = torch.Generator().manual_seed(n * m + k)
    h = (torch.randn(n, m, generator=g) - 1.0).requires_grad_(True)  # mostly negative values too
    vals, idx = dispatch.topk_select(h, k, backend=backend)
    ref_idx = torch.sort(h.detach().double(), dim=1, descending=True).indices[:, :k]
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    assert torch.equal(vals.detach(), h.detach().gather(1, idx))
    # straight-through: gradient 1 at the selected entries only
    w = torch.randn(n, k, generator=g)
    (vals * w).sum().backward()
    expect = torch.zeros(n, m).scatter(1, idx, w)
    assert torch.equal(h.grad, expect)


def test_topk_ties_take_exactly_k(backend):
    h = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    vals, idx = dispatch.topk_select(h, 3, backend=backend)
    assert idx.shape == (2, 3) and torch.all(vals == torch.tensor([[3.0], [2.0]]))
    assert all(len(set(r.tolist())) == 3 for r in idx)


@pytest.mark.parametrize("scope", ["layer", "all"])
@pytest.mark.parametrize(
    "n,n_layers,f,k_total", [(6, 3, 40, 11), (4, 2, 300, 1), (3, 2, 20, 60), (5, 1, 33, 165)]
)
def test_batchtopk_threshold_is_kth_largest(backend, scope, n, n_layers, f, k_total):
    g = torch.Generator().manual_seed(n + f + k_total)
    h = torch.randn(n, n_layers, f, generator=g) * 3
    tau = dispatch.batchtopk_threshold(h, k_total, scope, backend=backend)
    groups = h.transpose(0, 1).reshape(n_layers, -1) if scope == "layer" else h.reshape(1, -1)
    ref = groups.double().sort(dim=1, descending=True).values[:, min(k_total, groups.shape[1]) - 1]
    assert torch.equal(tau.double(), ref.expand(n_layers))


def test_batchtopk_threshold_strided_and_bf16(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 7, 50, generator=g)  # stored [L, N, F], seen as [N, L, F] (the encoder's layout)
    h = base.permute(1, 0, 2)
    for x in (h, h.to(torch.bfloat16)):
        for scope in ("layer", "all"):
            got = dispatch.batchtopk_threshold(x, 20, scope, backend=backend)
            ref = dispatch.batchtopk_threshold(x.float().contiguous(), 20, scope, backend="torch")
            assert torch.equal(got.float(), ref.float())
    assert torch.isinf(dispatch.batchtopk_threshold(h, 0, "layer", backend=backend)).all()


@pytest.mark.parametrize("scope", ["layer", "all"])
@pytest.mark.parametrize("positive", [True, False])
def test_batchtopk_select_matches_dense_mask(backend, scope, positive):
    g = torch.Generator().manual_seed(7)
    n, n_layers, f, k = 8, 3, 30, 2
    h = torch.randn(n, n_layers, f, generator=g) - 0.5
    h[2] = -5.0  # token 2 never selected: empty rows
    h = h.requires_grad_(True)
    idx, vals, tau = dispatch.batchtopk_select(h, k, scope, positive, backend=backend)
    keep = h.detach() >= tau[None, :, None]
    if positive:
        keep &= h.detach() > 0
    counts = keep.sum(-1)
    assert idx.shape[-1] == counts.max()
    assert torch.equal((idx >= 0).sum(-1), counts)
    assert (idx[2] == -1).all()
    # ids ascend within a row, padding after them, values are the pre-activations
    for r in idx.reshape(-1, idx.shape[-1]):
        ids = r[r >= 0]
        assert torch.equal(ids, ids.sort().values) and (r[len(ids) :] == -1).all()
    dense = _dense(idx, vals, f)
    assert torch.equal(dense.detach(), h.detach() * keep)
    total = keep.sum()
    k_total = k * n * (n_layers if scope == "all" else 1)
    if not positive:
        assert total == k_total if scope == "all" else torch.all(keep.sum((0, 2)) == k * n)
    wts = torch.randn(vals.shape, generator=g)
    (vals * wts).sum().backward()
    assert torch.equal(h.grad, _dense(idx, wts, f) * keep)


def test_select_backends_agree_exactly():
    if not has_triton():
        pytest.skip("no triton")
    g = torch.Generator().manual_seed(11)
    h = torch.randn(9, 2, 45, generator=g)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        for b in ("torch", "triton"):
            if b == "triton":
                for name in ("select_triton", "decode_triton"):
                    importlib.reload(importlib.import_module(f"torchtitan_clt.kernels.{name}"))
            out[b] = dispatch.batchtopk_select(h, 3, "layer", backend=b)
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["ge", "nonzero"])
def test_compact_modes(backend, mode):
    g = torch.Generator().manual_seed(5)
    acts = torch.relu(torch.randn(4, 2, 25, generator=g) - 1.0)
    acts[1, 0] = 0.0  # an empty row
    tau = torch.tensor([0.5, -1.0])
    idx, vals = dispatch.compact(acts, tau, mode, backend=backend)
    keep = (acts != 0) if mode == "nonzero" else acts >= tau[None, :, None]
    assert torch.equal(_dense(idx, vals, 25), acts * keep)
    assert torch.equal((idx >= 0).sum(-1), keep.sum(-1))


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("n,k,f,d", [(6, 5, 23, 19), (4, 3, 9, 300), (3, 1, 4, 2)])
def test_sparse_decode_forward_and_grads_vs_float64(backend, n, k, f, d):
    g = torch.Generator().manual_seed(n * k + d)
    idx, vals = _ragged_sparse(n, k, f, g)
    w = torch.randn(f, d, generator=g)
    grad_out = torch.randn(n, d, generator=g)
    v1, w1 = vals.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = dispatch.sparse_decode(idx, v1, w1, backend=backend, density_threshold=1.0)
    out.backward(grad_out)
    v2, w2 = vals.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = _dense(idx, v2, f) @ w2
    ref.backward(grad_out.double())
    assert out.dtype == torch.float32 and _rel(out, ref) < 1e-6
    assert _rel(w1.grad, w2.grad) < 1e-6
    assert _rel(v1.grad * (idx >= 0), v2.grad * (idx >= 0)) < 1e-6
    assert (v1.grad[idx < 0] == 0).all()  # padding gets no gradient


def test_sparse_decode_strided_bf16_and_dense_switch(backend):
    g = torch.Generator().manual_seed(2)
    n, k, f, d = 5, 4, 12, 40
    idx3, vals3 = _ragged_sparse(n * 2, k, f, g)
    idx, vals = idx3.view(n, 2, k)[:, 1], vals3.view(n, 2, k)[:, 1]  # strided rows
    w = torch.randn(f, 2 * d, generator=g)[:, d:]  # row stride 2d
    ref = _dense(idx, vals.double(), f) @ w.double()
    out = dispatch.sparse_decode(idx, vals, w, backend=backend, density_threshold=1.0)
    assert _rel(out, ref) < 1e-6
    wb = w.to(torch.bfloat16)
    ref_b = _dense(idx, vals.double(), f) @ wb.double()
    out_b = dispatch.sparse_decode(idx, vals, wb, backend=backend, density_threshold=1.0)
    assert out_b.dtype == torch.float32 and _rel(out_b, ref_b) < 5e-3
    dense = dispatch.sparse_decode(idx, vals, w, backend=backend, density_threshold=0.0)  # forced dense
    assert _rel(dense, ref) < 1e-6


def test_sparse_grad_weight_groups_by_feature(backend):
    g = torch.Generator().manual_seed(4)
    n, k, f, d = 7, 4, 6, 10  # few features: several entries per feature
    idx, vals = _ragged_sparse(n, k, f, g)
    x = torch.randn(n, 3, d, generator=g)[:, 1]  # strided like the encoder's x[:, l]
    got = dispatch.sparse_grad_weight(idx, vals, x, f, backend=backend)
    ref = _dense(idx, vals.double(), f).T @ x.double()
    assert _rel(got, ref) < 1e-6


@pytest.mark.parametrize("n,n_layers,f,d,k", [(5, 3, 11, 4, 3), (3, 1, 7, 6, 2), (4, 4, 9, 3, 4)])
def test_clt_sparse_decode_vs_float64(backend, n, n_layers, f, d, k):
    g = torch.Generator().manual_seed(n_layers * 10 + f)
    parts = [_ragged_sparse(n, k, f, g, empty_rows=(s % n,)) for s in range(n_layers)]
    idx = torch.stack([p[0] for p in parts], 1)  # [N, L, K]
    vals = torch.stack([p[1] for p in parts], 1)
    w_dec = [torch.randn(f, n_layers - s, d, generator=g) for s in range(n_layers)]
    b_dec = torch.randn(n_layers, d, generator=g)
    grad_out = torch.randn(n, n_layers, d, generator=g)
    v1 = vals.clone().requires_grad_(True)
    w1 = [w.clone().requires_grad_(True) for w in w_dec]
    b1 = b_dec.clone().requires_grad_(True)
    out = dispatch.clt_sparse_decode(idx, v1, w1, b1, backend=backend, density_threshold=1.0)
    out.backward(grad_out)
    v2 = vals.double().requires_grad_(True)
    w2 = [w.double().requires_grad_(True) for w in w_dec]
    b2 = b_dec.double().requires_grad_(True)
    acts = _dense(idx, v2, f)  # [N, L, F]
    ref = torch.stack(
        [  # y_t = b_t + sum_{s<=t} a_s W_dec,s[:, t-s]
            b2[t] + sum(acts[:, s] @ w2[s][:, t - s] for s in range(t + 1)) for t in range(n_layers)
        ],
        1,
    )
    ref.backward(grad_out.double())
    assert _rel(out, ref) < 1e-6
    assert _rel(b1.grad, b2.grad) < 1e-6
    assert _rel(v1.grad * (idx >= 0), v2.grad * (idx >= 0)) < 1e-6
    for a, b in zip(w1, w2):
        assert _rel(a.grad, b.grad) < 1e-6


def test_plt_sparse_decode_vs_float64(backend):
    g = torch.Generator().manual_seed(9)
    n, n_layers, f, d, k = 4, 2, 10, 5, 3
    parts = [_ragged_sparse(n, k, f, g) for _ in range(n_layers)]
    idx = torch.stack([p[0] for p in parts], 1)
    vals = torch.stack([p[1] for p in parts], 1).requires_grad_(True)
    w_dec = torch.randn(n_layers, f, d, generator=g, requires_grad=True)
    b_dec = torch.randn(n_layers, d, generator=g)
    out = dispatch.plt_sparse_decode(idx, vals, w_dec, b_dec, backend=backend, density_threshold=1.0)
    ref = torch.einsum("nlf,lfd->nld", _dense(idx, vals.double(), f), w_dec.double()) + b_dec.double()
    assert _rel(out, ref) < 1e-6
    (gw,) = torch.autograd.grad(out.sum(), w_dec)
    gw_ref = torch.einsum(
        "nlf,nld->lfd", _dense(idx, vals.detach().double(), f), torch.ones(n, n_layers, d).double()
    )
    assert _rel(gw, gw_ref) < 1e-6


def test_sparse_decode_unsorted_ids_and_all_padding(backend):
    g = torch.Generator().manual_seed(12)
    n, k, f, d = 5, 4, 30, 7
    idx = torch.stack([torch.randperm(f, generator=g)[:k] for _ in range(n)])  # unsorted (torch.topk order)
    idx[2, 1:] = -1
    vals = torch.randn(n, k, generator=g, requires_grad=True)
    w = torch.randn(f, d, generator=g, requires_grad=True)
    out = dispatch.sparse_decode(idx, vals, w, backend=backend, density_threshold=1.0)
    gv, gw = torch.autograd.grad(out, (vals, w), torch.ones(n, d))
    v64, w64 = vals.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = _dense(idx, v64, f) @ w64
    rv, rw = torch.autograd.grad(ref, (v64, w64), torch.ones(n, d).double())
    assert _rel(out, ref) < 1e-6 and _rel(gw, rw) < 1e-6 and _rel(gv * (idx >= 0), rv * (idx >= 0)) < 1e-6
    empty = torch.full((3, 2), -1)
    z = dispatch.sparse_decode(empty, torch.zeros(3, 2), w, backend=backend, density_threshold=1.0)
    assert z.shape == (3, d) and (z == 0).all()


@pytest.mark.parametrize("scope", ["layer", "all"])
@pytest.mark.parametrize("hot", [10, 40, 200])  # entries of one token far above the rest
def test_batchtopk_select_rows_with_many_entries(scope, hot):
    # the torch fallback looks at a few candidates per row first: rows holding many of the batch's
    # top entries must still come out exact (second tier, then the general fallback)
    g = torch.Generator().manual_seed(hot)
    n, n_layers, f, k = 16, 3, 300, 3
    h = torch.randn(n, n_layers, f, generator=g)
    h[5, :, :hot] += 10.0
    idx, vals, tau = dispatch.batchtopk_select(h, k, scope, backend="torch")
    groups = h.transpose(0, 1).reshape(n_layers, -1) if scope == "layer" else h.reshape(1, -1)
    k_total = k * n * (n_layers if scope == "all" else 1)
    ref_tau = groups.sort(dim=1, descending=True).values[:, k_total - 1].expand(n_layers)
    assert torch.equal(tau, ref_tau)
    keep = (h >= ref_tau[None, :, None]) & (h > 0)
    assert torch.equal(_dense(idx, vals, f), h * keep)
    assert torch.equal(dispatch.batchtopk_threshold(h, k_total, scope, backend="torch"), ref_tau)
