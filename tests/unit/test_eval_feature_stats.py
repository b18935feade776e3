"""Feature statistics against hand-worked toys and a float64 recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from torchtitan_clt.metrics.feature_stats import decoder_norms_by_offset, feature_stats
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs


def _model(family, L, d, F, act="relu", seed=0):
    args = TranscoderArgs(
        family=family,
        n_layers=L,
        d_in=d,
        d_out=d,
        features_per_layer=F,
        activation=act,
        layers=list(range(L)),
    )
    m = model_registry.get(family).build_fn(args)
    m.init_weights(seed)
    return m


def test_relu_identity_toy_by_hand():
    # One layer, d = F = 3, W_enc = W_dec = I, biases 0: ŷ = relu(x), acts = relu(x).
    m = _model("plt", 1, 3, 3)
    with torch.no_grad():
        m.W_enc.copy_(torch.eye(3)[None])
        m.W_dec.copy_(torch.eye(3)[None])
        m.b_enc.zero_()
        m.b_dec.zero_()
    x = torch.tensor([[1.0, -1.0, -2.0], [3.0, 1.0, -1.0], [-1.0, 2.0, -3.0], [1.0, 2.0, -2.0]])[:, None]
    y = x.clone()
    s = feature_stats(m, [(x[:2], y[:2]), (x[2:], y[2:])], dense_threshold=0.6)
    # Residual y − ŷ = min(x, 0): squared sums per token 5, 1, 10, 4 -> 20.
    # y mean over tokens = [1, 1, -2]; Σ‖y − ȳ‖² = (0+4+1+0) + (4+0+1+0) + (0+1+1+4)... per dim:
    # dim0: (0,2,-2,0)² = 8; dim1: (-2,0,1,1)² = 6; dim2: (0,1,-1,0)² = 2 -> 16.
    assert s["fvu_per_layer"][0] == pytest.approx(20 / 16)
    assert s["explained_variance_per_layer"][0] == pytest.approx(1 - 20 / 16)
    assert s["nmse_per_layer"][0] == pytest.approx(20 / (6 + 11 + 14 + 9))
    # Active features per token: 1, 2, 1, 2 -> L0 1.5. Frequencies: [3/4, 3/4, 0].
    assert s["l0_per_layer"][0] == pytest.approx(1.5)
    assert s["dead_frac_per_layer"][0] == pytest.approx(1 / 3)
    assert s["dense_frac_per_layer"][0] == pytest.approx(2 / 3)
    assert s["tokens"] == 4
    h = s["density_hist"]
    assert h["dead_per_layer"] == [1]
    assert sum(h["counts_per_layer"][0]) == 2
    k = int((math.log10(0.75) - h["log10_edges"][0]) / (h["log10_edges"][1] - h["log10_edges"][0]))
    assert h["counts_per_layer"][0][k] == 2
    assert s["decoder_norm_by_offset"] is None  # a PLT has no cross-layer writes


def test_random_clt_matches_float64_recomputation():
    torch.manual_seed(0)
    m = _model("clt", 3, 8, 16, seed=2)
    with torch.no_grad():
        m.b_enc.fill_(0.05)
    x = torch.randn(64, 3, 8)
    y = torch.randn(64, 3, 8) * 0.3 + 1.0
    s = feature_stats(m, [(x[:20], y[:20]), (x[20:], y[20:])])
    with torch.no_grad():
        acts = m.encode(x).double()
        yh = m.decode(acts.float()).double()
    yd = y.double()
    fvu = ((yd - yh) ** 2).sum((0, 2)) / ((yd - yd.mean(0)) ** 2).sum((0, 2))
    freq = (acts != 0).double().mean(0)  # [L, F]
    assert s["fvu_per_layer"] == pytest.approx(fvu.tolist(), rel=1e-5)
    assert s["fvu"] == pytest.approx(fvu.mean().item(), rel=1e-5)
    assert s["l0_per_layer"] == pytest.approx((acts != 0).double().sum(2).mean(0).tolist())
    assert s["dead_frac_per_layer"] == pytest.approx((freq == 0).double().mean(1).tolist())
    assert s["dense_frac_per_layer"] == pytest.approx((freq > 0.1).double().mean(1).tolist())
    assert 0 < s["l0"] < 16


def test_clt_decoder_norms_by_offset_by_hand():
    L, d, F = 3, 4, 5
    m = _model("clt", L, d, F)
    with torch.no_grad():
        for s, W in enumerate(m.W_dec):
            W.zero_()
            for o in range(L - s):
                W[:, o, 0] = (o + 1) * torch.arange(1, F + 1, dtype=torch.float32)  # feature f: (o+1)·f
        m.out_scale.fill_(2.0)  # raw norms double
    r = decoder_norms_by_offset(m)
    mean_f = 2 * sum(range(1, F + 1)) / F  # 2 · mean(f) = 6
    for s in range(L):
        for o in range(L):
            if s + o < L:
                assert r["mean"][s][o] == pytest.approx((o + 1) * mean_f)
                tot = sum((q + 1) ** 2 for q in range(L - s))
                assert r["share"][s][o] == pytest.approx((o + 1) ** 2 / tot)
            else:
                assert math.isnan(r["mean"][s][o])
    assert r["per_offset"]["mean"] == pytest.approx([(o + 1) * mean_f for o in range(L)])
    assert r["per_offset"]["p50"][0] == pytest.approx(2 * 3.0)  # median of 2·f, f = 1..5
