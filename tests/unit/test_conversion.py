"""TopK / BatchTopK -> JumpReLU: L0 and FVU kept on held-out activations (synthetic dictionary)."""

import pytest
import torch

from torchtitan_clt.models.activations import JumpReLU
from torchtitan_clt.models.conversion import evaluate, to_jumprelu
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
    assert rep["thresholds"] == "feature" and raw["thresholds"] == "layer"  # "auto"


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
