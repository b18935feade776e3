"""Compiled Triton kernels on CUDA (no interpreter) at sizes that exercise multi-block loops, bf16
weights, many entries per feature and more rows than CUDA's grid axis 1 allows (65,535). Skipped
without a GPU (every test here, including the check that the kernels are compiled, is skipped on
CPU); run by scripts/gpu_check.sh. The ``triton_compiled`` fixture (tests/conftest.py) reloads the
kernel modules compiled: an earlier ``backend`` test leaves them interpreted for the session."""

from __future__ import annotations

import os

import pytest
import torch

from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.backend import has_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and has_triton()), reason="needs CUDA + triton"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="compiled kernels only"
    ),
    pytest.mark.usefixtures("triton_compiled"),
]


def test_kernels_are_compiled_not_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from torchtitan_clt.kernels import decode_triton, select_triton

    for mod in (select_triton, decode_triton):
        for name in dir(mod):
            if name.endswith("_kernel"):
                assert not isinstance(getattr(mod, name), InterpretedFunction), f"{mod.__name__}.{name}"


def test_topk_past_the_grid_axis_1_limit():
    # 4096 tokens x 17 layers = 69,632 rows: the old (1, rows) launch failed here.
    g = torch.Generator(device="cuda").manual_seed(3)
    h = torch.randn(4096 * 17, 512, device="cuda", generator=g)
    vals, idx = dispatch.topk_select(h, 32, backend="triton")
    ref = torch.topk(h, 32, dim=1).indices.sort(1).values
    assert torch.equal(idx.sort(1).values, ref)
    assert torch.equal(vals, h.gather(1, idx))


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_batchtopk_many_rows(scope):
    g = torch.Generator(device="cuda").manual_seed(4)
    h = torch.randn(8192, 16, 1024, device="cuda", generator=g)
    idx_t, vals_t, tau_t = dispatch.batchtopk_select(h, 16, scope, backend="triton")
    idx_r, vals_r, tau_r = dispatch.batchtopk_select(h, 16, scope, backend="torch")
    assert torch.equal(tau_t, tau_r) and torch.equal(idx_t, idx_r)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _dense(idx, vals, f):
    out = torch.zeros(*idx.shape[:-1], f, dtype=vals.dtype, device=vals.device)
    return out.scatter_add(-1, idx.clamp(min=0), torch.where(idx >= 0, vals, torch.zeros_like(vals)))


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_batchtopk_large(scope):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(512, 6, 5000, device="cuda", generator=g)
    h[:, :, :50] = 3.0  # many exact ties, right at the threshold
    for x in (h, h.to(torch.bfloat16)):
        idx_t, vals_t, tau_t = dispatch.batchtopk_select(x, 24, scope, backend="triton")
        idx_r, vals_r, tau_r = dispatch.batchtopk_select(x, 24, scope, backend="torch")
        assert torch.equal(tau_t.float(), tau_r.float())
        assert torch.equal(idx_t, idx_r) and torch.equal(vals_t, vals_r)


def test_topk_large():
    h = torch.randn(3000, 16384, device="cuda")
    vals, idx = dispatch.topk_select(h, 64, backend="triton")
    ref = torch.topk(h, 64, dim=1).indices.sort(1).values
    assert torch.equal(idx.sort(1).values, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_large(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    n, k, f, d = 1024, 48, 4096, 3000
    idx = torch.randint(0, 300, (n, k), device="cuda", generator=g)  # hot features: many entries each
    idx = torch.where(torch.rand(n, k, device="cuda", generator=g) < 0.2, -1, idx)
    vals = torch.randn(n, k, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(f, d, device="cuda", generator=g).to(dtype).requires_grad_(True)
    go = torch.randn(n, d, device="cuda", generator=g)
    out = dispatch.sparse_decode(idx, vals, w, backend="triton", density_threshold=1.0)
    gv, gw = torch.autograd.grad(out, (vals, w), go)
    v64, w64 = vals.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = _dense(idx, v64, f) @ w64
    rv, rw = torch.autograd.grad(ref, (v64, w64), go.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out, ref) < tol and _rel(gv * (idx >= 0), rv * (idx >= 0)) < tol and _rel(gw, rw) < tol


def test_clt_step_triton_matches_torch():
    from torchtitan_clt.kernels.sparse_step import clt_sparse_loss

    g = torch.Generator(device="cuda").manual_seed(2)
    n, n_layers, f, d, k = 256, 4, 2048, 256, 16
    ws = [
        torch.randn(n_layers, f, d, device="cuda", generator=g) * d**-0.5,
        torch.zeros(n_layers, f, device="cuda"),
    ]
    ws += [torch.randn(f, n_layers - s, d, device="cuda", generator=g) * 0.02 for s in range(n_layers)]
    ws += [torch.zeros(n_layers, d, device="cuda")]
    x = torch.randn(n, n_layers, d, device="cuda", generator=g)
    y = torch.randn(n, n_layers, d, device="cuda", generator=g)
    grads = {}
    for b in ("torch", "triton"):
        ps = [w.clone().requires_grad_(True) for w in ws]
        loss, _ = clt_sparse_loss(
            x, y, ps[0], ps[1], ps[2:-1], ps[-1], k, "layer", 0.1, backend=b, density_threshold=1.0
        )
        loss.backward()
        grads[b] = (loss.detach(), [p.grad for p in ps])
    assert _rel(grads["triton"][0], grads["torch"][0]) < 1e-5
    for a, r in zip(grads["triton"][1], grads["torch"][1]):
        assert _rel(a, r) < 1e-4
