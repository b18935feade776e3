"""JumpReLU's threshold gradient on the sparse decode path equals the dense one (float64, 1e-10).

The STE's ∂L/∂θ reads ∂L/∂a where a = 0 but θ − ε/2 < h ≤ θ; a sparse decoder that only carries
the nonzero activations loses it there (the bug: 29.3 vs 59.0 summed |∂L/∂log θ| in a CLT with
L=3, F=200, 4 % active). The decoders now also carry ``activation.grad_support(h)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt import kernels
from torchtitan_clt.models.losses import reconstruction_loss

L, D, F, B = 3, 8, 200, 64


@pytest.fixture(autouse=True)
def _restore_kernel_options():
    before = copy.copy(kernels.options())
    yield
    kernels.configure(before.backend, before.sparse_density_threshold)


def _model(family: str) -> torch.nn.Module:
    m = tiny_model(family, "jumprelu", L=L, d=D, F=F, seed=2, jumprelu_bandwidth=0.5).double().train()
    with torch.no_grad():
        # thresholds such that ~4 % of the entries fire and many more sit inside the STE window
        h = m.pre_acts(
            torch.randn(4096, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        )
        per_layer = h.transpose(0, 1).reshape(L, -1)
        theta = torch.quantile(per_layer, 0.96, dim=1)
        m.activation.log_threshold.copy_(theta.clamp_min(1e-3).log()[:, None].expand(L, F))
        # a window as wide as the band of the next ~4 % below θ: many zero entries get ∂a/∂θ ≠ 0
        m.activation.bandwidth = float(2 * (theta - torch.quantile(per_layer, 0.92, dim=1)).mean())
    return m


def _grads(m, xs, ys, density_threshold: float):
    kernels.configure(sparse_density_threshold=density_threshold)
    m.zero_grad()
    out = m.forward_std(xs)
    reconstruction_loss(out.y_hat, ys).backward()
    frac = float((out.acts != 0).double().mean())
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, frac


def _spy_sparse_decode(monkeypatch) -> list[int]:
    """Counts the sparse decodes (the CLT's entry decoder, the PLT's sparse layout decoder)."""
    from torchtitan_clt.models.clt import model as clt_model

    calls = []
    real_entries, real_plt = clt_model.decode_entries, kernels.plt_sparse_decode

    def entries(*a, **kw):
        calls.append(1)
        return real_entries(*a, **kw)

    def plt(*a, **kw):
        calls.append(1)
        return real_plt(*a, **kw)

    monkeypatch.setattr(clt_model, "decode_entries", entries)
    monkeypatch.setattr(kernels, "plt_sparse_decode", plt)
    return calls


@pytest.mark.parametrize("family", ["clt", "plt"])
def test_threshold_gradient_sparse_equals_dense_float64(family, monkeypatch):
    sparse_m = _model(family)
    dense_m = copy.deepcopy(sparse_m)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(B, L, D, dtype=torch.float64, generator=g)
    ys = torch.randn(B, L, D, dtype=torch.float64, generator=g)

    grads_d, frac = _grads(dense_m, xs, ys, density_threshold=0.0)
    calls = _spy_sparse_decode(monkeypatch)
    grads_s, _ = _grads(sparse_m, xs, ys, density_threshold=0.2)
    assert calls, "the sparse decoder did not run"
    assert 0.01 < frac < 0.08, frac

    g_theta = grads_d["activation.log_threshold"]
    assert float(g_theta.abs().sum()) > 0
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-10, atol=1e-10, msg=name)

    # Without the window entries the threshold gradient is wrong: the comparison above can fail.
    lossy = copy.deepcopy(dense_m)
    monkeypatch.setattr(type(lossy.activation), "grad_support", lambda self, h: None)
    grads_l, _ = _grads(lossy, xs, ys, density_threshold=0.2)
    lost = (grads_l["activation.log_threshold"] - g_theta).abs().sum()
    assert lost > 0.1 * g_theta.abs().sum(), (float(lost), float(g_theta.abs().sum()))
