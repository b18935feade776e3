"""The sparse training forward (TopK / BatchTopK through ``kernels.sparse_step``) of the CLT, the PLT
and the SAE against their dense path, in float64: outputs, every loss term used with them, all
gradients, tracked thresholds."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt import kernels
from torchtitan_clt.config import JobConfig
from torchtitan_clt.kernels.selection import Selection
from torchtitan_clt.metrics.training import DeadFeatureTracker
from torchtitan_clt.models.losses import build_loss_fn

L, D, F, B = 3, 4, 128, 16  # k = 2 (tiny_args): k / F and (k + k_aux) / F under the 5 % switch

CASES = [("batchtopk", "layer"), ("batchtopk", "all"), ("topk", "layer")]


@pytest.fixture(autouse=True)
def _restore_kernel_options():
    before = copy.copy(kernels.options())
    yield
    kernels.configure(before.backend, before.sparse_density_threshold)


def _model(act: str, scope: str, family: str = "clt") -> torch.nn.Module:
    m = tiny_model(family, act, L=L, d=D, F=F, batchtopk_scope=scope, decoder_norm="concat", seed=3)
    with torch.no_grad():  # biases away from 0 so no selection sits on a tie
        m.b_enc.copy_(torch.randn(L, F, generator=torch.Generator().manual_seed(4)) * 0.1)
        m.b_dec.copy_(torch.randn(L, D, generator=torch.Generator().manual_seed(5)))
    return m.double().train()


def _loss_fn(lambda_preact: float = 0.0):
    cfg = JobConfig()
    cfg.loss.sparsity, cfg.loss.lambda_sparsity, cfg.loss.lambda_warmup_steps = "tanh", 0.3, 0
    cfg.loss.tanh_c = 2.0
    cfg.loss.auxk_alpha, cfg.loss.auxk_k, cfg.loss.dead_after_tokens = 0.5, 2, 10
    cfg.loss.lambda_preact, cfg.loss.lambda_preact_warmup_steps = lambda_preact, 0
    dead = DeadFeatureTracker(L, F, dead_after_tokens=10)
    fired = torch.rand(L, F, generator=torch.Generator().manual_seed(6)) < 0.6
    dead.update_fired(fired, 10)  # ~40 % of the features dead: AuxK has something to do
    return build_loss_fn(cfg.loss, dead_features=dead)


def _step(m, xs, ys, loss_fn, density_threshold: float):
    """What the trainer's micro-step runs: forward_std, the loss, backward."""
    kernels.configure(sparse_density_threshold=density_threshold)
    out = m.forward_std(xs)
    loss, terms = loss_fn(m, out, ys, 1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out, loss, terms, grads


@pytest.mark.parametrize("act,scope", CASES)
@pytest.mark.parametrize("family,lambda_preact", [("clt", 0.0), ("clt", 0.2), ("plt", 0.0), ("sae", 0.2)])
def test_sparse_forward_matches_dense_path_float64(backend, act, scope, family, lambda_preact):
    kernels.configure(backend=backend)
    sparse_m = _model(act, scope, family)
    dense_m = copy.deepcopy(sparse_m)
    g = torch.Generator().manual_seed(7)
    xs, ys = torch.randn(B, L, D, generator=g).double(), torch.randn(B, L, D, generator=g).double()
    loss_fn = _loss_fn(lambda_preact)  # one tracker for both: the same features are dead

    out_d, loss_d, terms_d, grads_d = _step(dense_m, xs, ys, loss_fn, density_threshold=0.0)
    out_s, loss_s, terms_s, grads_s = _step(sparse_m, xs, ys, loss_fn, density_threshold=0.05)

    # the sparse path really ran (the dense one has no custom encoder node)
    assert "SparseEncode" in type(out_s.pre_acts.grad_fn).__name__
    assert "SparseEncode" not in type(out_d.pre_acts.grad_fn).__name__
    assert (out_s.acts != 0).sum() > 0 and terms_d["auxk"] > 0 and terms_d["sparsity"] > 0
    torch.testing.assert_close(out_s.pre_acts, out_d.pre_acts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s.acts, out_d.acts, rtol=1e-12, atol=1e-12)
    # The loss terms are taken in fp32 (models/losses.py): a last-bit difference of y_hat in fp64
    # can round to the neighbouring fp32 value, hence fp32-level tolerances from y_hat on; the
    # Triton kernels accumulate in fp32 whatever the input dtype.
    tol = {"rtol": 1e-10, "atol": 1e-10} if backend == "torch" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out_s.y_hat, out_d.y_hat, **tol)
    tol = {"rtol": 1e-6, "atol": 1e-7} if backend == "torch" else {"rtol": 1e-5, "atol": 1e-6}
    assert set(terms_s) == set(terms_d)
    for name in terms_d:
        torch.testing.assert_close(terms_s[name], terms_d[name], **tol, msg=name)
    torch.testing.assert_close(loss_s, loss_d, **tol)
    w_dec = "W_dec.0" if family == "clt" else "W_dec"
    assert set(grads_s) == set(grads_d) and {"W_enc", "b_enc", w_dec, "b_dec"} <= set(grads_d)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], **tol, msg=name)
    act_s, act_d = sparse_m.activation, dense_m.activation
    torch.testing.assert_close(act_s.threshold, act_d.threshold, rtol=0, atol=0)
    assert torch.equal(act_s.threshold_updates, act_d.threshold_updates)


def test_density_switch_and_eval_take_the_dense_path():
    m = _model("batchtopk", "layer")
    xs = torch.randn(4, L, D, dtype=torch.float64)
    kernels.configure(sparse_density_threshold=0.05)
    assert m.sparse_selection() == Selection("batchtopk", 2, "layer")
    kernels.configure(sparse_density_threshold=0.01)  # k / F = 2 / 128 > 1 %: dense
    assert m.sparse_selection() is None
    kernels.configure(sparse_density_threshold=0.05)
    m.eval()  # BatchTopK at inference is JumpReLU with the tracked threshold: dense
    assert m.sparse_selection() is None
    assert "SparseEncode" not in type(m.forward_std(xs).pre_acts.grad_fn).__name__
    relu = tiny_model("clt", "relu", L=L, d=D, F=F)
    assert relu.sparse_selection() is None
