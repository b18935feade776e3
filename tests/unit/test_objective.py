"""Objective terms: pre-activation loss, AuxK, Matryoshka nesting, and their wiring in build_loss_fn."""

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.config import JobConfig
from torchtitan_clt.metrics.training import DeadFeatureTracker
from torchtitan_clt.models.losses import (
    auxk_loss,
    build_loss_fn,
    matryoshka_reconstruction_loss,
    preact_loss,
    reconstruction_loss,
)
from torchtitan_clt.protocols.transcoder import TranscoderOutput


def _model(family="plt", act="relu", L=1, d=2, F=3, extra=None, **kw):
    return tiny_model(family, act, L=L, d=d, F=F, extra=extra, **kw)


def test_preact_loss_by_hand():
    h = torch.tensor([[[0.5, -1.0]], [[2.0, 0.01]]])  # [B=2, L=1, F=2]
    theta = torch.tensor([[0.1, 0.2]])
    norms = torch.tensor([[2.0, 3.0]])
    # token 0: ReLU(0.1 − 0.5)·2 + ReLU(0.2 + 1)·3 = 3.6; token 1: 0 + 0.19·3 = 0.57
    assert preact_loss(h, theta, norms).item() == pytest.approx((3.6 + 0.57) / 2)
    # ReLU: θ = 0 -> token 0: 1·3, token 1: 0
    assert preact_loss(h, torch.zeros(1, 2), norms).item() == pytest.approx(1.5)


def test_preact_term_uses_the_activation_threshold_and_warms_up():
    cfg = JobConfig()
    cfg.loss.sparsity, cfg.loss.lambda_preact, cfg.loss.lambda_preact_warmup_steps = "none", 0.5, 10
    m = _model("clt", act="jumprelu", L=2, d=3, F=4, decoder_norm="concat")
    with torch.no_grad():
        m.activation.log_threshold.copy_(torch.rand(2, 4).log())
    x, y = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    out = m.forward_std(x)
    loss, terms = build_loss_fn(cfg.loss)(m, out, y, step=5)
    h, theta, norms = (
        out.pre_acts.double(),
        m.activation.threshold().double(),
        m.decoder_norms("concat").double(),
    )
    want_pre = (torch.relu(theta - h) * norms).sum((1, 2)).mean()
    want_rec = (out.y_hat.double() - y.double()).pow(2).sum((1, 2)).mean()
    assert terms["preact"].item() == pytest.approx(want_pre.item(), rel=1e-5)
    assert loss.item() == pytest.approx((want_rec + 0.25 * want_pre).item(), rel=1e-5)
    # θ is a target, not a parameter of the term: the threshold gets no gradient from it
    terms_only = build_loss_fn(cfg.loss)(m, m.forward_std(x), out.y_hat.detach(), step=10)[0]
    terms_only.backward()
    assert m.activation.log_threshold.grad is None or m.activation.log_threshold.grad.abs().sum() == 0


def _plt_by_hand():
    m = _model("plt", act="relu")
    with torch.no_grad():
        m.W_dec.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
        m.b_dec.fill_(5.0)  # the bias must not enter ê
    return m


def test_auxk_loss_by_hand():
    m = _plt_by_hand()
    h = torch.tensor([[[3.0, 0.5, 2.0]], [[1.0, -1.0, -3.0]]], requires_grad=True)  # [B=2, L=1, F=3]
    out = TranscoderOutput(pre_acts=h, acts=torch.relu(h), y_hat=torch.zeros(2, 1, 2, requires_grad=True))
    y = torch.tensor([[[3.0, 1.0]], [[1.0, -2.0]]])
    dead = torch.tensor([[False, True, True]])
    # k_aux = 1: token 0 takes feature 2 (h = 2) -> ê0 = (2, 2); token 1's best dead h is −1 -> ê1 = 0.
    # e = y − 0; ‖e − ê‖² = 1 + 1 + 1 + 4 = 7; ē = (2, −0.5); ‖e − ē‖² = 1 + 2.25 + 1 + 2.25 = 6.5
    loss = auxk_loss(m, out, y, dead, k_aux=1)
    assert loss.item() == pytest.approx(7 / 6.5)
    loss.backward()
    # only the selected dead pre-activation gets a gradient: d/dh = −2 (e − ê)·W_dec,2 / 6.5 = 0
    # ((e0 − ê0) = (1, −1) is orthogonal to (1, 1)); the reconstruction is detached
    assert out.y_hat.grad is None
    assert torch.equal(h.grad[:, :, :2], torch.zeros(2, 1, 2)) and torch.equal(h.grad[1], torch.zeros(1, 3))
    # k_aux = 2: token 0 adds feature 1 (0.5·(0, 1)): ê0 = (2, 2.5); ‖e0 − ê0‖² = 1 + 2.25
    assert auxk_loss(m, out, y, dead, k_aux=2).item() == pytest.approx((3.25 + 5) / 6.5)
    nothing = auxk_loss(m, out, y, torch.zeros(1, 3, dtype=torch.bool), k_aux=4)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_auxk_loss_matches_float64_reference_on_a_clt():
    torch.manual_seed(0)
    m = _model("clt", act="batchtopk", L=3, d=4, F=6)
    x, y = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    out = m.forward_std(x)
    dead = torch.rand(3, 6) < 0.5
    dead[0, 0] = True
    k = 2
    # reference: per token and layer, the k largest dead pre-activations, ReLU, decoded by hand
    h = out.pre_acts.detach().double()
    a = torch.zeros_like(h)
    for b in range(8):
        for layer in range(3):
            idx = dead[layer].nonzero().flatten()
            top = sorted(idx.tolist(), key=lambda i: -h[b, layer, i].item())[:k]
            for i in top:
                a[b, layer, i] = max(h[b, layer, i].item(), 0.0)
    e_hat = torch.zeros(8, 3, 4, dtype=torch.float64)
    for t in range(3):
        for s in range(t + 1):
            e_hat[:, t] += a[:, s] @ m.W_dec[s][:, t - s].double()
    e = y.double() - out.y_hat.detach().double()
    want = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert auxk_loss(m, out, y, dead, k).item() == pytest.approx(want.item(), rel=1e-5)


def test_auxk_on_a_molt_decodes_from_the_input():
    m = _model("molt", act="jumprelu", L=2, d=4, F=3, extra={"molt_ranks": [2, 1], "molt_counts": [1, 2]})
    x, y = torch.randn(6, 2, 4), torch.randn(6, 2, 4)
    out = m.forward_std(x)
    assert out.xs is x
    dead = torch.ones(2, 3, dtype=torch.bool)
    loss = auxk_loss(m, out, y, dead, k_aux=3)
    a = torch.relu(out.pre_acts.detach())
    e_hat = m.decode_std(a, x) - m.decode_std(torch.zeros_like(a), x)
    e = y - out.y_hat.detach()
    want = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_auxk_term_reads_the_dead_feature_tracker():
    cfg = JobConfig()
    cfg.loss.sparsity, cfg.loss.auxk_alpha, cfg.loss.auxk_k, cfg.loss.dead_after_tokens = "none", 0.5, 1, 10
    with pytest.raises(ValueError, match="dead-feature tracker"):
        build_loss_fn(cfg.loss)
    tracker = DeadFeatureTracker(1, 3, dead_after_tokens=10)
    loss_fn = build_loss_fn(cfg.loss, dead_features=tracker)
    m = _plt_by_hand()
    h = torch.tensor([[[3.0, 0.5, 2.0]], [[1.0, -1.0, -3.0]]])
    out = TranscoderOutput(pre_acts=h, acts=torch.relu(h), y_hat=torch.zeros(2, 1, 2))
    y = torch.tensor([[[3.0, 1.0]], [[1.0, -2.0]]])
    _, terms = loss_fn(m, out, y, 1)
    assert terms["auxk"].item() == 0.0  # nothing dead yet
    tracker.update_fired(torch.tensor([[True, False, False]]), 10)  # features 1, 2 silent for 10 tokens
    loss, terms = loss_fn(m, out, y, 2)
    assert terms["auxk"].item() == pytest.approx(7 / 6.5)
    # α is relative to the FVU: the term is weighted by α·L·d_out (L = 1 layer, d_out = 2 here)
    assert loss.item() == pytest.approx(terms["recon"].item() + 0.5 * (1 * 2) * 7 / 6.5)


def test_matryoshka_loss_with_one_prefix_is_the_plain_loss():
    cfg = JobConfig()
    cfg.loss.sparsity = "none"
    extra = {"matryoshka_prefixes": [6]}
    mat = _model("matryoshka_clt", act="batchtopk", L=3, d=4, F=6, extra=extra)
    clt = _model("clt", act="batchtopk", L=3, d=4, F=6)
    clt.load_state_dict(mat.state_dict())
    x, y = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    out_m, out_c = mat.forward_std(x), clt.forward_std(x)
    assert len(out_m.y_hat_prefixes) == 1
    loss_m, _ = build_loss_fn(cfg.loss)(mat, out_m, y, 1)
    loss_c, _ = build_loss_fn(cfg.loss)(clt, out_c, y, 1)
    torch.testing.assert_close(loss_m, loss_c)
    assert matryoshka_reconstruction_loss([out_c.y_hat], y).item() == pytest.approx(
        reconstruction_loss(out_c.y_hat, y).item()
    )


def test_matryoshka_loss_averages_the_prefixes():
    cfg = JobConfig()
    cfg.loss.sparsity = "none"
    m = _model("matryoshka_clt", act="topk", L=2, d=3, F=4, extra={"matryoshka_prefixes": [1, 3]})
    x, y = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    out = m.forward_std(x)
    want = 0.0
    for hi in (1, 3, 4):
        y_hat = m.b_dec.double().expand(5, 2, 3).clone()
        for t in range(2):
            for s in range(t + 1):
                y_hat[:, t] += out.acts[:, s, :hi].double() @ m.W_dec[s][:hi, t - s].double()
        want += (y_hat - y.double()).pow(2).sum((1, 2)).mean().item() / 3
    loss, terms = build_loss_fn(cfg.loss)(m, out, y, 1)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the prefixes pull harder on the first features than the full reconstruction alone
    loss.backward()
    assert m.W_dec[0].grad[0].abs().sum() > 0


def test_molt_sparsity_is_weighted_by_the_transform_norm():
    cfg = JobConfig()
    cfg.loss.sparsity, cfg.loss.lambda_sparsity, cfg.loss.tanh_c = "l1", 1.0, 1.0
    m = _model(
        "molt",
        act="relu",
        L=1,
        d=4,
        F=3,
        extra={"molt_ranks": [2, 1], "molt_counts": [1, 2]},
        decoder_norm="concat",
    )
    x = torch.randn(5, 1, 4)
    out = m.forward_std(x)
    _, terms = build_loss_fn(cfg.loss)(m, out, torch.zeros(5, 1, 4), 1)
    norms = []
    for U, V in zip(m.U, m.V):
        for j in range(U.shape[1]):
            norms.append(torch.linalg.matrix_norm(U[0, j].double().T @ V[0, j].double()))
    want = (out.acts.double()[:, 0] * torch.stack(norms)).sum(-1).mean()
    assert terms["sparsity"].item() == pytest.approx(want.item(), rel=1e-5)
