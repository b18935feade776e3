"""Hooked activations vs an independent recomputation, early stop, BOS drop, layer errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.hooks import HOOK_POINTS, d_model, decoder_layers, hook_module, n_layers
from torchtitan_clt.data.llm import load_llm

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def models():
    return {
        name: load_llm(str(ASSETS / name), "float32", "cpu")[0]
        for name in ("tiny_llama", "tiny_gpt2", "tiny_gemma2", "tiny_qwen3")
    }


def _tokens(b=2, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(3, 259, (b, t), generator=g)
    tok[:, 0] = 0  # BOS
    return tok


def _rms(x, w, eps, gemma=False):
    scale = (1.0 + w) if gemma else w
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _reference(model, tokens):
    """Per layer {point: [B, T, d]}, from hidden_states + the attention output + hand-written MLPs.

    The attention output is read with the test's own hook on the attention's output projection
    (Gemma-2: its post-attention norm); everything after it is recomputed by hand.
    """
    kind = model.config.model_type
    layers = decoder_layers(model)
    attn_out = {}
    handles = []
    for i, layer in enumerate(layers):
        mod = {"gpt2": lambda m: m.attn.c_proj, "gemma2": lambda m: m.post_attention_layernorm}.get(
            kind, lambda m: m.self_attn.o_proj
        )(layer)
        handles.append(mod.register_forward_hook(lambda m, a, o, i=i: attn_out.__setitem__(i, o)))
    with torch.no_grad():
        hs = model(input_ids=tokens, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    ref = []
    for i, layer in enumerate(layers):
        mid = hs[i] + attn_out[i]
        if kind == "gpt2":
            ln = layer.ln_2
            mlp_in = F.layer_norm(mid, (mid.shape[-1],), ln.weight, ln.bias, ln.eps)
            mlp = layer.mlp
            hid = mlp_in @ mlp.c_fc.weight + mlp.c_fc.bias
            hid = 0.5 * hid * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hid + 0.044715 * hid**3)))
            mlp_out = hid @ mlp.c_proj.weight + mlp.c_proj.bias
        elif kind == "gemma2":
            mlp_in = _rms(mid, layer.pre_feedforward_layernorm.weight, 1e-6, gemma=True)
            m = layer.mlp
            act = F.gelu(mlp_in @ m.gate_proj.weight.T, approximate="tanh")
            raw = (act * (mlp_in @ m.up_proj.weight.T)) @ m.down_proj.weight.T
            mlp_out = _rms(raw, layer.post_feedforward_layernorm.weight, 1e-6, gemma=True)
        else:
            norm = layer.post_attention_layernorm
            mlp_in = _rms(mid, norm.weight, norm.variance_epsilon)
            m = layer.mlp
            mlp_out = (
                F.silu(mlp_in @ m.gate_proj.weight.T) * (mlp_in @ m.up_proj.weight.T)
            ) @ m.down_proj.weight.T
        post = mid + mlp_out
        if i + 1 < len(layers):  # the last hidden state has the final norm applied
            torch.testing.assert_close(post, hs[i + 1], atol=1e-5, rtol=1e-5)
        ref.append({"resid_mid": mid, "mlp_in": mlp_in, "mlp_out": mlp_out, "resid_post": post})
    return ref


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_gemma2", "tiny_qwen3"])
def test_every_hook_point_matches_reference(models, name):
    model = models[name]
    tokens = _tokens()
    ref = _reference(model, tokens)
    layers = [0, 2, 3]
    pairs = [("resid_mid", "mlp_out"), ("mlp_in", "resid_post"), ("resid_post", "resid_post")]
    for hook_in, hook_out in pairs:
        x, y = ActivationExtractor(model, hook_in, hook_out, layers)(tokens)
        b, t = tokens.shape
        assert x.shape == (b * (t - 1), len(layers), d_model(model)) and x.dtype == torch.float32
        for j, layer in enumerate(layers):
            # BOS (position 0) dropped: rows are positions 1..T-1 of each context, context-major.
            want_x = ref[layer][hook_in][:, 1:].reshape(-1, x.shape[-1])
            want_y = ref[layer][hook_out][:, 1:].reshape(-1, y.shape[-1])
            torch.testing.assert_close(x[:, j], want_x, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y[:, j], want_y, atol=1e-5, rtol=1e-5)


def test_points_differ(models):
    # Guards against every point reading the same tensor (which the reference test could miss if
    # the reference were built wrongly in the same way).
    model = models["tiny_llama"]
    x, y = ActivationExtractor(model, "resid_mid", "mlp_out", [1])(_tokens())
    a, b = ActivationExtractor(model, "mlp_in", "resid_post", [1])(_tokens())
    for u, v in [(x, y), (x, a), (x, b), (y, a), (y, b), (a, b)]:
        assert not torch.allclose(u, v)


def test_forward_stops_after_last_needed_hook(models):
    model = models["tiny_llama"]
    layers = decoder_layers(model)
    calls = {"layer2_out": 0, "layer3": 0, "norm": 0}
    hs = [
        layers[2].register_forward_hook(lambda *a: calls.__setitem__("layer2_out", calls["layer2_out"] + 1)),
        layers[3].register_forward_pre_hook(lambda *a: calls.__setitem__("layer3", calls["layer3"] + 1)),
        model.model.norm.register_forward_pre_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1)),
    ]
    try:
        ActivationExtractor(model, "resid_mid", "mlp_out", [0, 2])(_tokens())
        assert calls == {"layer2_out": 0, "layer3": 0, "norm": 0}
        ActivationExtractor(model, "resid_mid", "resid_post", [0, 2])(_tokens())
        assert calls == {"layer2_out": 1, "layer3": 0, "norm": 0}
    finally:
        for h in hs:
            h.remove()
    # The extractor leaves no hooks behind: a plain forward runs to the end.
    out = model(input_ids=_tokens()).logits
    assert out.shape[-1] == model.config.vocab_size


def test_layer_out_of_range(models):
    with pytest.raises(ConfigError, match="4 layers"):
        ActivationExtractor(models["tiny_llama"], "resid_mid", "mlp_out", [0, 4])
    with pytest.raises(ConfigError, match="increasing"):
        ActivationExtractor(models["tiny_llama"], "resid_mid", "mlp_out", [2, 1])
    with pytest.raises(ConfigError, match="resid_mid"):
        ActivationExtractor(models["tiny_llama"], "resid", "mlp_out", [0])


def test_all_layers_by_default_and_helpers(models):
    for model in models.values():
        assert n_layers(model) == 4 and d_model(model) == 64
        ext = ActivationExtractor(model, "resid_mid", "mlp_out")
        assert ext.layers == [0, 1, 2, 3]
        for point in HOOK_POINTS:
            module, kind = hook_module(model, 1, point)
            assert kind in ("input", "output") and isinstance(module, torch.nn.Module)


def test_unsupported_architecture():
    class Cfg:
        model_type = "bert"

    m = torch.nn.Linear(2, 2)
    m.config = Cfg()
    with pytest.raises(ConfigError, match="gpt2.*llama|llama.*gpt2"):
        hook_module(m, 0, "mlp_out")


def test_mlp_out_splice_changes_output(models):
    # What evaluation does: replace mlp_out through hook_module; zeroing it must change the logits.
    model = models["tiny_gemma2"]
    tokens = _tokens()
    clean = model(input_ids=tokens).logits
    module, kind = hook_module(model, 1, "mlp_out")
    assert kind == "output"
    h = module.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        ablated = model(input_ids=tokens).logits
    finally:
        h.remove()
    assert not torch.allclose(clean, ablated)
    torch.testing.assert_close(model(input_ids=tokens).logits, clean)
