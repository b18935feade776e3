"""Standardization: statistics by hand, b_dec from the target mean, and folding for every family."""

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.components.standardization import (
    estimate_standardization,
    init_b_dec_from_mean,
    resolve_b_dec_init,
)
from torchtitan_clt.config import JobConfig

FAMILY_ACTS = [
    (f, a)
    for f in ("plt", "clt", "sae", "molt", "matryoshka_clt")
    for a in ("relu", "jumprelu", "topk", "batchtopk")
    if not (f == "matryoshka_clt" and a in ("relu", "jumprelu"))
]


def _model(family, act, L=3, d=4, F=6):
    m = tiny_model(family, act, L=L, d=d, F=F)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.b_enc.copy_(0.1 * torch.randn(m.b_enc.shape, generator=g))
        m.b_dec.copy_(torch.randn(m.b_dec.shape, generator=g))
    return m


def _batches(seed=0, n=4, B=16, L=3, d=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(B, L, d, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 2.0
        y = torch.randn(B, L, d, generator=g) * 4.0 - 1.0
        out.append((x, y))
    return out


@pytest.mark.parametrize("mode", ["none", "scalar", "per_dim"])
def test_estimate_standardization_by_float64(mode):
    data = _batches()
    it = iter(data)
    stats = estimate_standardization(lambda b: next(it), 64, 16, mode, mode)
    x = torch.cat([b[0] for b in data]).double()
    y = torch.cat([b[1] for b in data]).double()
    for (mean, scale), a in (((stats[0], stats[1]), x), ((stats[2], stats[3]), y)):
        mu, var = a.mean(0), a.var(0, unbiased=False)
        if mode == "none":
            want_mean, want_scale = torch.zeros_like(mu), torch.ones_like(mu)
        elif mode == "per_dim":
            want_mean, want_scale = mu, var.sqrt()
        else:  # one scale per layer: E‖a − μ‖² / d = 1 after scaling
            want_mean, want_scale = mu, var.mean(-1, keepdim=True).sqrt().expand_as(mu)
        torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scale.double(), want_scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.target_mean.double(), y.mean(0), rtol=1e-5, atol=1e-5)
    m = _model("plt", "relu")
    m.set_standardization(*stats)  # still the 4-tuple set_standardization takes
    xs = m.standardize_in(x.float())
    if mode != "none":
        assert xs.mean(0).abs().max() < 1e-4


@pytest.mark.parametrize("targets", ["none", "scalar"])
def test_b_dec_from_target_mean(targets):
    data = _batches(seed=2)
    it = iter(data)
    stats = estimate_standardization(lambda b: next(it), 64, 16, "per_dim", targets)
    m = _model("sae", "relu")
    m.set_standardization(*stats)
    init_b_dec_from_mean(m, stats.target_mean)
    y = torch.cat([b[1] for b in data])
    # a model whose features are all off outputs the target mean, in raw units
    torch.testing.assert_close(m.decode(torch.zeros(1, 3, 6))[0], y.mean(0), rtol=1e-4, atol=1e-4)
    if targets == "scalar":
        assert m.b_dec.abs().max() < 1e-5  # centered targets: the mean is 0 in standardized units


def test_b_dec_init_defaults_per_family():
    cfg = JobConfig()
    for family, want in [("sae", "mean"), ("plt", "zero"), ("clt", "zero"), ("molt", "zero")]:
        cfg.model.name = family
        assert resolve_b_dec_init(cfg.model) == want
    cfg.model.b_dec_init = "mean"
    assert resolve_b_dec_init(cfg.model) == "mean"


@pytest.mark.parametrize("family,act", FAMILY_ACTS)
@pytest.mark.parametrize("modes", [("per_dim", "scalar"), ("scalar", "per_dim")])
def test_folded_model_reproduces_the_standardized_one(family, act, modes):
    """Raw in -> raw out is the same before and after folding the statistics into the weights."""
    m = _model(family, act)
    data = _batches(seed=3)
    it = iter(data)
    m.set_standardization(*estimate_standardization(lambda b: next(it), 64, 16, *modes))
    if act == "batchtopk":
        m.forward_std(m.standardize_in(data[0][0]))  # track an inference threshold
    m.eval()
    x = _batches(seed=4, n=1)[0][0]
    h, acts, y = m.pre_acts(m.standardize_in(x)), m.encode(x), m(x)
    assert acts.count_nonzero() > 0
    m.fold_standardization()
    assert torch.equal(m.in_scale, torch.ones_like(m.in_scale)) and torch.equal(
        m.out_mean, torch.zeros_like(m.out_mean)
    )
    torch.testing.assert_close(m.pre_acts(x), h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.encode(x), acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-4)
