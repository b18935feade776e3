"""Loss terms against hand-worked values; build_loss_fn wiring."""

import math

import pytest
import torch

from torchtitan_clt.config import JobConfig
from torchtitan_clt.models.clt.model import CrossLayerTranscoder
from torchtitan_clt.models.losses import (
    build_loss_fn,
    l1_sparsity,
    lambda_at,
    reconstruction_loss,
    tanh_sparsity,
)
from torchtitan_clt.protocols.transcoder import TranscoderArgs


def test_reconstruction_loss_by_hand():
    y = torch.zeros(2, 2, 2)  # [B, L, d]
    y_hat = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]])
    # token 0: 1 + 4 + 0 + 1 = 6; token 1: 9 -> mean 7.5
    assert reconstruction_loss(y_hat, y).item() == pytest.approx(7.5)


def test_sparsity_terms_by_hand():
    acts = torch.tensor([[[0.5, 0.0], [1.0, 2.0]], [[0.0, 0.0], [0.25, 0.0]]])  # [B=2, L=2, F=2]
    norms = torch.tensor([[2.0, 3.0], [0.5, 1.0]])  # [L, F]
    c = 3.0
    # token 0: tanh(3·0.5·2) + tanh(3·1·0.5) + tanh(3·2·1) = tanh 3 + tanh 1.5 + tanh 6
    # token 1: tanh(3·0.25·0.5) = tanh 0.375
    want = (math.tanh(3) + math.tanh(1.5) + math.tanh(6) + math.tanh(0.375)) / 2
    assert tanh_sparsity(acts, norms, c).item() == pytest.approx(want, rel=1e-6)
    # L1: token 0: 1 + 0.5 + 2 = 3.5; token 1: 0.125 -> mean 1.8125
    assert l1_sparsity(acts, norms).item() == pytest.approx(1.8125)


def test_lambda_ramp():
    assert lambda_at(0, 2.0, 10) == 0.0
    assert lambda_at(5, 2.0, 10) == pytest.approx(1.0)
    assert lambda_at(10, 2.0, 10) == 2.0
    assert lambda_at(50, 2.0, 10) == 2.0
    assert lambda_at(0, 2.0, 0) == 2.0


def _clt(decoder_norm="concat"):
    args = TranscoderArgs(
        family="clt",
        n_layers=2,
        d_in=3,
        d_out=3,
        features_per_layer=4,
        activation="jumprelu",
        jumprelu_threshold_init=0.05,
        decoder_norm=decoder_norm,
    )
    m = CrossLayerTranscoder(args)
    m.init_weights(0)
    return m


@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("kind", ["tanh", "l1"])
def test_build_loss_fn_combines_terms(mode, kind):
    cfg = JobConfig()
    cfg.loss.sparsity = kind
    cfg.loss.decoder_norm = mode
    cfg.loss.lambda_sparsity = 0.5
    cfg.loss.lambda_warmup_steps = 4
    cfg.loss.tanh_c = 2.0
    model = _clt(decoder_norm="concat")  # forward's norms are reused only when modes agree
    torch.manual_seed(0)
    xs, ys = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    out = model.forward_std(xs)
    loss_fn = build_loss_fn(cfg.loss)
    loss, terms = loss_fn(model, out, ys, step=1)
    norms = model.decoder_norms(mode)
    recon = ((out.y_hat - ys) ** 2).sum(dim=(1, 2)).mean()
    if kind == "tanh":
        sp = torch.tanh(2.0 * out.acts * norms).sum(dim=(1, 2)).mean()
    else:
        sp = (out.acts * norms).sum(dim=(1, 2)).mean()
    assert set(terms) == {"recon", "sparsity", "lambda"}
    assert terms["lambda"].item() == pytest.approx(0.125)  # 0.5 · 1/4
    assert terms["recon"].item() == pytest.approx(recon.item(), rel=1e-6)
    assert terms["sparsity"].item() == pytest.approx(sp.item(), rel=1e-6)
    assert loss.item() == pytest.approx((recon + 0.125 * sp).item(), rel=1e-6)
    assert all(not t.requires_grad for t in terms.values())
    loss.backward()
    assert model.activation.log_threshold.grad is not None


def test_concat_and_sum_norms_differ_in_the_loss():
    cfg = JobConfig()
    model = _clt()
    torch.manual_seed(0)
    out = model.forward_std(torch.randn(4, 2, 3))
    assert out.acts.count_nonzero() > 0
    losses = {}
    for mode in ("concat", "sum"):
        cfg.loss.decoder_norm = mode
        losses[mode] = build_loss_fn(cfg.loss)(model, out, torch.zeros(4, 2, 3), step=10**6)[1]["sparsity"]
    assert not torch.allclose(losses["concat"], losses["sum"])


def test_sparsity_none_has_only_recon():
    cfg = JobConfig()
    cfg.loss.sparsity = "none"
    model = _clt()
    out = model.forward_std(torch.randn(4, 2, 3))
    loss, terms = build_loss_fn(cfg.loss)(model, out, torch.zeros(4, 2, 3), step=3)
    assert set(terms) == {"recon"}
    assert loss.item() == pytest.approx(terms["recon"].item())
