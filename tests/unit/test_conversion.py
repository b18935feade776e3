"""TopK / BatchTopK -> JumpReLU: L0 and FVU kept on held-out activations (synthetic dictionary)."""

import pytest
import torch

from torchtitan_clt.models.activations import JumpReLU
from torchtitan_clt.models.conversion import evaluate, side_by_side, to_jumprelu
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

L, D, F, K = 2, 64, 96, 3


def _dictionary():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(L, F, D, generator=g)
    return W / W.norm(dim=-1, keepdim=True)


def _data(W, n, seed):
    """x = Σ_i s_i W_i + noise, with about K active sources per token and layer (Bernoulli, so the
    count varies between tokens)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, L, F, generator=g) < K / F) * (0.5 + torch.rand(n, L, F, generator=g))
    return torch.einsum("nlf,lfd->nld", s, W) + 0.05 * torch.randn(n, L, D, generator=g)


def _sae(act, scope="layer", family="sae"):
    """An SAE that knows the dictionary (a stand-in for a trained one), its threshold tracked."""
    W = _dictionary()
    extra = {"matryoshka_prefixes": [16]} if family == "matryoshka_clt" else {}
    hooks = ("resid_post", "resid_post") if family == "sae" else ("resid_mid", "mlp_out")
    args = TranscoderArgs(
        family=family,
        n_layers=L,
        d_in=D,
        d_out=D,
        features_per_layer=F,
        activation=act,
        k=K,
        batchtopk_scope=scope,
        hook_in=hooks[0],
        hook_out=hooks[1],
        extra=extra,
    )
    m = model_registry.get(family).build_fn(args)
    m.init_weights(0)
    with torch.no_grad():
        m.W_enc.copy_(W)
        m.b_enc.fill_(-0.05)
        if family == "sae":
            m.W_dec.copy_(W)
        else:  # a CLT writing only to its own layer
            for s, Wd in enumerate(m.W_dec):
                Wd.zero_()
                Wd[:, 0] = W[s]
        m.b_dec.zero_()
    m.train()
    for i in range(10):
        m.forward_std(_data(W, 256, 100 + i))  # what training leaves: the tracked threshold
    return m, W


def _check(rep, fvu_rel):
    for before, after in zip(rep["l0_before"], rep["l0_after"]):
        assert abs(after - before) <= 0.1 * before, rep
    assert abs(rep["fvu_after_mean"] - rep["fvu_before_mean"]) <= fvu_rel * rep["fvu_before_mean"], rep


@pytest.mark.parametrize("scope", ["layer", "all"])
@pytest.mark.parametrize("thresholds", ["layer", "feature"])
def test_batchtopk_conversion_keeps_l0_and_fvu_on_held_out_data(scope, thresholds):
    m, W = _sae("batchtopk", scope)
    calib = [(x, x) for x in (_data(W, 1024, 1), _data(W, 1024, 2))]
    held_out = [(x, x) for x in (_data(W, 1024, 3),)]
    new, rep = to_jumprelu(m, calib, calibrate=True, thresholds=thresholds, eval_batches=held_out)
    assert isinstance(new.activation, JumpReLU) and new.args.activation == "jumprelu"
    assert rep["converted"] and rep["calibrated"] and rep["eval_tokens"] == 1024
    assert rep["fvu_before_mean"] < 0.5  # the source model is a good one
    _check(rep, fvu_rel=0.03)
    # the source is untouched
    assert m.args.activation == "batchtopk" and m.training


def test_topk_conversion_needs_calibration():
    m, W = _sae("topk")
    calib = [(x, x) for x in (_data(W, 1024, 1), _data(W, 1024, 2))]
    held_out = [(x, x) for x in (_data(W, 1024, 3),)]
    with pytest.warns(UserWarning, match="calibrate"):
        _, raw = to_jumprelu(m, None, eval_batches=held_out)
    # TopK's tracked threshold is the smallest selected value of a whole batch: far too low
    assert raw["l0_after_mean"] > 2 * raw["l0_before_mean"]
    _, rep = to_jumprelu(m, calib, calibrate=True, eval_batches=held_out)
    for before, after in zip(rep["l0_before"], rep["l0_after"]):
        assert abs(after - before) <= 0.1 * before, rep
    assert rep["fvu_after_mean"] < raw["fvu_after_mean"]
    assert rep["thresholds"] == "match" and raw["thresholds"] == "layer"  # "auto" for TopK
    assert rep["refine_steps"] > 0 and raw["refine_steps"] == 0  # fitted by default (TopK only)


def test_uncalibrated_batchtopk_conversion_is_its_inference_model():
    """Without batches, θ is the tracked per-layer threshold: exactly what BatchTopK's eval does."""
    m, W = _sae("batchtopk")
    new, rep = to_jumprelu(m)
    assert rep["converted"] and not rep["calibrated"] and "l0_after" not in rep
    x = _data(W, 64, 9)
    torch.testing.assert_close(new.eval()(x), m.eval()(x))
    torch.testing.assert_close(new.activation.feature_thresholds(), m.activation.feature_thresholds())


def test_matryoshka_converts_to_a_plain_clt():
    m, W = _sae("batchtopk", family="matryoshka_clt")
    held_out = [(_data(W, 512, 3), None)]  # no target: FVU against the source's own output
    new, rep = to_jumprelu(m, [(_data(W, 512, 1), None)], eval_batches=held_out)
    assert new.args.family == "clt" and type(new).__name__ == "CrossLayerTranscoder"
    assert rep["family"] == "clt" and rep["fvu_after_mean"] < 0.2


def test_conversion_errors_and_no_ops():
    relu, _ = _sae("relu")
    same, rep = to_jumprelu(relu)
    assert same is relu and not rep["converted"]
    m, W = _sae("batchtopk")
    with pytest.raises(ValueError, match="batches"):
        to_jumprelu(m, thresholds="feature")
    fresh = model_registry.get("sae").build_fn(m.args)
    fresh.init_weights(0)
    with pytest.raises(ValueError, match="never tracked"):
        to_jumprelu(fresh)
    ev = evaluate(m, [(_data(W, 256, 5), _data(W, 256, 5))])
    assert ev["tokens"] == 256 and len(ev["l0_per_layer"]) == L


# --- exact answers --------------------------------------------------------------------------------
def _separable_sae(n_feat=48, d=64):
    """An SAE with orthonormal encoder = decoder rows, on data with exactly K active sources of
    amplitude ≥ 1 per token and tiny noise: TopK(K) picks exactly the active sources, and so does
    any threshold in the wide gap between the noise and 1. Every conversion must reproduce it."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    W = q[:n_feat].float()[None].expand(L, n_feat, d).clone()  # [L, F, d], orthonormal rows
    args = TranscoderArgs(
        family="sae",
        n_layers=L,
        d_in=d,
        d_out=d,
        features_per_layer=n_feat,
        activation="topk",
        k=K,
        hook_in="resid_post",
        hook_out="resid_post",
    )
    m = model_registry.get("sae").build_fn(args)
    m.init_weights(0)
    with torch.no_grad():
        m.W_enc.copy_(W)
        m.W_dec.copy_(W)
        m.b_enc.zero_()
        m.b_dec.zero_()

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        idx = torch.rand(n, L, n_feat, generator=g).argsort(-1)[..., :K]  # exactly K sources
        s = torch.zeros(n, L, n_feat).scatter(-1, idx, 1.0 + torch.rand(n, L, K, generator=g))
        return torch.einsum("nlf,lfd->nld", s, W) + 0.01 * torch.randn(n, L, d, generator=g)

    return m.eval(), data


@pytest.mark.parametrize(
    "thresholds,steps,options",
    [("feature", 0, {}), ("match", 0, {}), ("match", 50, {}), ("match", 50, {"fit_gain": True})],
)
def test_topk_reproducible_by_thresholds_converts_exactly(thresholds, steps, options):
    m, data = _separable_sae()
    calib = [(x, x) for x in (data(512, 1), data(512, 2))]
    x = data(1024, 3)
    new, rep = to_jumprelu(
        m,
        calib,
        thresholds=thresholds,
        refine_steps=steps,
        refine_options=options,
        eval_batches=[(x, x)],
        refit_decoder=False,  # the decoder is the source's: the same reconstruction
    )
    with torch.no_grad():
        assert torch.equal(new.encode(x) != 0, m.encode(x) != 0)  # the same features, token by token
    assert rep["l0_before"] == [float(K)] * L and rep["l0_after"] == pytest.approx([float(K)] * L)
    assert rep["fvu_before_mean"] < 0.01
    if steps == 0:  # the weights are the source's: the same reconstruction
        assert rep["fvu_after_mean"] == pytest.approx(rep["fvu_before_mean"], rel=1e-4, abs=1e-7)
    else:  # the fit may only trade the noise's share, never lose the reconstruction
        assert rep["fvu_after_mean"] <= 1.02 * rep["fvu_before_mean"] + 1e-5


def test_l0_calibration_hits_its_target():
    from torchtitan_clt.models.conversion import _calibrate

    g = torch.Generator().manual_seed(4)
    h = torch.randn(300, 3, 40, generator=g).exp() - 1.2  # [N, L, F], skewed, some ≤ 0
    theta = 0.2 + torch.rand(3, 40, generator=g)
    theta[1, :5] = 0.0  # ReLU features count whatever the scale
    # layer 1: at least its ReLU features' ~630 positive values (the reachable range)
    for target in (torch.tensor([300, 1200, 3000]), torch.tensor([7, 900, 2500])):
        got = _calibrate(h, theta, target)
        counts = (h > got).sum((0, 2))  # counted independently of _calibrate
        assert torch.equal(counts, target), (counts, target)
        ratio = got[theta > 0] / theta[theta > 0]
        for layer in range(3):  # one factor per layer
            r = (got[layer] / theta[layer])[theta[layer] > 0]
            torch.testing.assert_close(r, r[:1].expand_as(r))
        assert bool((ratio > 0).all())


def test_match_thresholds_minimize_the_weighted_disagreement():
    """Against a brute force over every cut, float64, on random pre-activations and selections."""
    from torchtitan_clt.models.conversion import _match_thresholds

    g = torch.Generator().manual_seed(5)
    h = torch.randn(25, 2, 6, generator=g)
    fired = (h + 0.8 * torch.randn(25, 2, 6, generator=g)) > 0.7
    theta = _match_thresholds(h, fired)

    def cost(hv, fv, t):
        w = hv.double().clamp_min(0) ** 2
        on = hv > t
        return float((w * (on & ~fv)).sum() + (w * (~on & fv)).sum())

    for layer in range(2):
        for f in range(6):
            hv, fv = h[:, layer, f], fired[:, layer, f]
            cuts = torch.cat([hv, hv.max()[None] + 1, hv.min()[None] - 1]).clamp_min(0.0)
            best = min(cost(hv, fv, t) for t in cuts.tolist())
            assert cost(hv, fv, float(theta[layer, f])) == pytest.approx(best, abs=1e-9)


def test_threshold_fit_lowers_fvu_and_keeps_l0():
    m, W = _sae("topk")
    calib = [(x, x) for x in (_data(W, 1024, 1), _data(W, 1024, 2))]
    held_out = [(x, x) for x in (_data(W, 2048, 3),)]
    _, plain = to_jumprelu(m, calib, thresholds="match", refine_steps=0, eval_batches=held_out)
    _, fit = to_jumprelu(m, calib, thresholds="match", refine_steps=150, eval_batches=held_out)
    assert plain["refine_steps"] == 0 and fit["refine_steps"] == 150 and fit["refine_history"]
    # On this synthetic SAE that already holds the true dictionary the "match" cut is close to the
    # best one: the fit may only hold held-out FVU (measured 0.2013 vs 0.2010 since the sparse step
    # and per-shard init changed the float path), and on real data it lowers it (benchmarks/results).
    assert fit["fvu_after_mean"] <= 1.005 * plain["fvu_after_mean"]
    hist = fit["refine_history"]
    assert hist[-1]["fvu"] < hist[0]["fvu"]  # the fit lowers what it minimises
    for before, after in zip(fit["l0_before"], fit["l0_after"]):
        assert abs(after - before) <= 0.1 * before


# --- issue 30: one model, rare features kept ----------------------------------------------------
def test_feature_thresholds_by_hand():
    from torchtitan_clt.models.conversion import feature_thresholds

    h = torch.tensor([[3.0, 0.1], [2.0, 0.2], [1.0, 0.3]])  # [N=3, F=2]
    count = torch.tensor([2, 0])
    # feature 0 fired twice: between its 2nd (2.0) and 3rd (1.0) largest; feature 1 never: the layer's
    torch.testing.assert_close(feature_thresholds(h, count, 0.5, min_firings=1), torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(feature_thresholds(h, count, 0.5, min_firings=3), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(feature_thresholds(h, torch.tensor([3, 1]), 0.5, 1), torch.tensor([1.0, 0.25]))


def test_batchtopk_default_is_the_native_model():
    m, W = _sae("batchtopk")
    calib = [(x, x) for x in (_data(W, 1024, 1),)]
    held_out = [(x, x) for x in (_data(W, 1024, 3),)]
    new, rep = to_jumprelu(m, calib, eval_batches=held_out)
    assert rep["thresholds"] == "native" and not rep["calibrated"]
    x = _data(W, 64, 9)
    torch.testing.assert_close(new.eval()(x), m.eval()(x), rtol=0, atol=0)
    native, export = side_by_side(rep)
    assert native == export


def test_rare_features_keep_the_layer_threshold_on_held_out_rows():
    """Calibrated on few rows, a per-feature cut silences the features it saw rarely or never (the
    old rule: θ = the largest value seen); the fallback to the layer's threshold keeps them."""
    m, W = _sae("batchtopk")
    calib = [(x, x) for x in (_data(W, 96, 1),)]  # ~3 firings per feature: many seen 0-2 times
    held_out = [(x, x) for x in (_data(W, 4096, 3),)]
    m.activation.calibrate_threshold([m.pre_acts(m.standardize_in(calib[0][0]))], 96)
    _, old = to_jumprelu(m, calib, thresholds="feature", eval_batches=held_out, min_firings=1)
    _, new = to_jumprelu(m, calib, thresholds="feature", eval_batches=held_out)  # min_firings 8
    native, n = side_by_side(new)
    o = side_by_side(old)[1]
    assert n["never_fire"] <= native["never_fire"], (n, native)
    # the old cut fires the rarely seen features less than the model does: L0 and FVU drift
    assert o["l0"] < 0.95 * native["l0"] and o["fvu"] > native["fvu"] + 0.005, (o, native)
    assert abs(n["l0"] - native["l0"]) < 0.5 * abs(o["l0"] - native["l0"]), (n, o, native)
    assert n["fvu"] < o["fvu"], (n, o)
