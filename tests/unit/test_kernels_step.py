"""The sparse CLT step against the dense-decoder step (float64), backend selection, sparsity term."""

from __future__ import annotations

import pytest
import torch

from torchtitan_clt.kernels import backend as kb
from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.sparse_step import clt_dense_loss, clt_sparse_forward, clt_sparse_loss


def _weights(n_layers, f, d, seed):
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(n_layers, f, d, generator=g)
    b_enc = torch.randn(n_layers, f, generator=g) * 0.3
    w_dec = [torch.randn(f, n_layers - s, d, generator=g) for s in range(n_layers)]
    b_dec = torch.randn(n_layers, d, generator=g)
    return [w_enc, b_enc, *w_dec, b_dec]


@pytest.mark.parametrize("scope", ["layer", "all"])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_sparse_step_matches_dense_step_float64(backend, scope, lam):
    n, n_layers, f, d, k = 6, 3, 16, 5, 2
    ws = _weights(n_layers, f, d, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, n_layers, d, generator=g)
    y = torch.randn(n, n_layers, d, generator=g)
    ref = [w.double().requires_grad_(True) for w in ws]
    x_ref = x.double().requires_grad_(True)
    loss_ref, terms_ref = clt_dense_loss(
        x_ref, y.double(), ref[0], ref[1], ref[2:-1], ref[-1], k, scope, lam, 2.0
    )
    loss_ref.backward()
    got = [w.clone().requires_grad_(True) for w in ws]
    x_got = x.clone().requires_grad_(True)
    loss, terms = clt_sparse_loss(
        x_got,
        y,
        got[0],
        got[1],
        got[2:-1],
        got[-1],
        k,
        scope,
        lam,
        2.0,
        backend=backend,
        density_threshold=1.0,
    )
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert abs(terms["sparsity"].item() - terms_ref["sparsity"].item()) <= 1e-5 * (
        1 + terms_ref["sparsity"].item()
    )
    for a, b in [(x_got, x_ref), *zip(got, ref)]:
        err = (a.grad.double() - b.grad).norm() / b.grad.norm().clamp(min=1e-12)
        assert err < 1e-5


def test_sparse_forward_outputs(backend):
    n, n_layers, f, d, k = 5, 2, 12, 4, 3
    ws = _weights(n_layers, f, d, seed=3)
    x = torch.randn(n, n_layers, d, generator=torch.Generator().manual_seed(4))
    out = clt_sparse_forward(x, ws[0], ws[1], ws[2:-1], ws[-1], k, "layer", backend=backend)
    h = torch.einsum("nld,lfd->nlf", x, ws[0]) + ws[1]
    acts = out.to_dense(f)
    assert torch.allclose(acts[acts != 0], h[acts != 0], atol=1e-5)
    assert torch.all(out.l0() <= k)  # positive-only BatchTopK keeps at most k*N per layer
    assert torch.equal((acts > 0).sum(), (out.idx >= 0).sum())
    pos = torch.where(acts > 0, acts, torch.inf)
    assert torch.equal(out.min_positive(), pos.amin(dim=(0, 2)).detach())


def test_tanh_sparsity_sparse_matches_dense():
    g = torch.Generator().manual_seed(6)
    n, n_layers, f = 4, 2, 9
    acts = torch.relu(torch.randn(n, n_layers, f, generator=g) - 0.8).double()
    norms = torch.rand(n_layers, f, generator=g).double()
    idx, vals = dispatch.compact(acts, torch.zeros(n_layers), "nonzero", backend="torch")
    got = dispatch.tanh_sparsity_sparse(idx, vals, norms, c=1.7)
    ref = torch.tanh(1.7 * acts * norms[None]).sum(dim=(0, 2))
    assert torch.allclose(got, ref)
    w = torch.randn(f, 3, 4, generator=g)
    assert torch.allclose(dispatch.decoder_row_norms(w), w.reshape(f, -1).norm(dim=1))


def test_backend_resolution(monkeypatch):
    t = torch.zeros(2)
    assert kb.resolve_backend(t, "torch") == "torch"
    assert kb.resolve_backend(t, "auto") == "torch"  # CPU tensors never pick Triton on auto
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kb.resolve_backend(t, "triton")
    with pytest.raises(ValueError, match="kernels.backend"):
        kb.configure(backend="cuda")
    with pytest.raises(ValueError, match="sparse_density_threshold"):
        kb.configure(sparse_density_threshold=1.5)
    old = kb.options().sparse_density_threshold
    try:
        kb.configure(sparse_density_threshold=0.25)
        assert kb.options().sparse_density_threshold == 0.25
    finally:
        kb.configure(sparse_density_threshold=old)


def test_density_switch_gives_the_same_clt_decode():
    g = torch.Generator().manual_seed(8)
    n, n_layers, f, d = 4, 3, 10, 3
    acts = torch.relu(torch.randn(n, n_layers, f, generator=g))  # dense-ish: about half active
    idx, vals = dispatch.compact(acts, torch.zeros(n_layers), "nonzero", backend="torch")
    ws = _weights(n_layers, f, d, seed=9)
    sparse = dispatch.clt_sparse_decode(idx, vals, ws[2:-1], ws[-1], backend="torch", density_threshold=1.0)
    dense = dispatch.clt_sparse_decode(idx, vals, ws[2:-1], ws[-1], backend="torch", density_threshold=0.0)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_configure_from_job_config():
    from torchtitan_clt.config import load_config

    old = (kb.options().backend, kb.options().sparse_density_threshold)
    try:
        cfg = load_config(["--kernels.backend=torch", "--kernels.sparse_density_threshold=0.2"])
        opts = kb.configure_from_job(cfg.kernels)
        assert (opts.backend, opts.sparse_density_threshold) == ("torch", 0.2)
    finally:
        kb.configure(*old)
