"""Steering / ablating a feature (torchtitan_clt.tracing.steer) on the tiny Llama: the next-token
distribution after the intervention equals a float64 recomputation that applies it through the
transcoder's full encode / decode (not the steerer's one-row shortcut), and it moves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from torchtitan_clt.data.hooks import hook_module, output_tensor
from torchtitan_clt.data.llm import load_llm
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs
from torchtitan_clt.tracing.steer import FeatureSteerer, Intervention, parse_feature

ASSETS = Path(__file__).resolve().parents[1] / "assets"
L, D, F = 4, 64, 32


@pytest.fixture(scope="module")
def llm():
    model, tokenizer = load_llm(str(ASSETS / "tiny_llama"), "float32", "cpu")
    return model.eval(), tokenizer


def transcoder(family="clt", seed=0):
    args = TranscoderArgs(
        family=family,
        n_layers=L,
        d_in=D,
        d_out=D,
        features_per_layer=F,
        activation="jumprelu",
        hook_in="resid_mid",
        hook_out="mlp_out",
        layers=list(range(L)),
    )
    m = model_registry.get(family).build_fn(args)
    m.init_weights(seed)
    with torch.no_grad():
        m.activation.log_threshold.fill_(torch.log(torch.tensor(0.05)).item())
        for p in m.parameters():  # large writes, so that the intervention moves the output
            if p.dim() >= 2:
                p.mul_(4.0)
    return m.eval()


def reference_probs(llm, tc, tokens, layer, feature, new_fn):
    """float64: at ``layer`` the transcoder's full encode; feature column replaced by new_fn(a);
    every target gets decode(A') − decode(A)."""
    llm64, tc64 = copy.deepcopy(llm).double(), copy.deepcopy(tc).double()
    delta = {}

    def read(m, args, kwargs):
        x = (args[0] if args else next(iter(kwargs.values()))).double()  # [1, T, d]
        X = torch.zeros(x.shape[1], L, D, dtype=torch.float64)
        X[:, layer] = x[0]
        A = tc64.encode(X)
        A2 = A.clone()
        A2[:, layer, feature] = new_fn(A[:, layer, feature][None])[0]
        delta["d"] = tc64.decode(A2, features_only=True) - tc64.decode(A, features_only=True)  # [T, L, d]

    handles = [hook_module(llm64, layer, "resid_mid")[0].register_forward_pre_hook(read, with_kwargs=True)]
    for t in range(layer, L):

        def write(m, args, out, t=t):
            return output_tensor(out) + delta["d"][None, :, t]

        handles.append(hook_module(llm64, t, "mlp_out")[0].register_forward_hook(write))
    try:
        with torch.no_grad():
            logits = llm64(input_ids=tokens, use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return torch.softmax(logits, -1)


def _active_feature(steerer, llm_model, tokens, layer):
    """The feature of ``layer`` active at most positions of the prompt (after BOS)."""
    seen = {}

    def read(m, args, kwargs):
        seen["x"] = args[0] if args else next(iter(kwargs.values()))

    h = hook_module(llm_model, layer, "resid_mid")[0].register_forward_pre_hook(read, with_kwargs=True)
    with torch.no_grad():
        llm_model(input_ids=tokens, use_cache=False)
    h.remove()
    acts = torch.stack([steerer.activation(layer, f, seen["x"])[0, 1:] for f in range(F)])  # [F, T-1]
    return int((acts > 0).sum(1).argmax()), int((acts > 0).sum(1).argmin())


@pytest.mark.parametrize("family", ["clt", "plt"])
def test_steering_matches_a_float64_recomputation(llm, family):
    model, tokenizer = llm
    tc = transcoder(family)
    steerer = FeatureSteerer(model, tc)
    tokens = tokenizer("the cat sat on the mat and the dog", return_tensors="pt").input_ids
    layer = 1
    on, off = _active_feature(steerer, model, tokens, layer)
    before = steerer.next_token_probs(tokens)
    ref_before = reference_probs(model, tc, tokens, layer, on, lambda a: a)
    torch.testing.assert_close(before, ref_before, atol=1e-6, rtol=1e-5)
    cases = [
        (Intervention(layer, on, scale=6.0), on, lambda a: torch.cat([a[:, :1], 6.0 * a[:, 1:]], 1)),
        (Intervention(layer, on, scale=0.0), on, lambda a: torch.cat([a[:, :1], 0 * a[:, 1:]], 1)),
        (
            Intervention(layer, off, value=3.0),
            off,
            lambda a: torch.cat([a[:, :1], torch.full_like(a[:, 1:], 3.0)], 1),
        ),
    ]
    for iv, f, fn in cases:
        after = steerer.next_token_probs(tokens, [iv])
        ref = reference_probs(model, tc, tokens, layer, f, fn)
        torch.testing.assert_close(after, ref, atol=1e-6, rtol=1e-5)
        # it moves the output by far more than the tolerance (the tiny LLM's output is near uniform)
        assert (after / before - 1).abs().max() > 0.01 and (after - before).abs().max() > 1e-5, iv
    # the hooks are gone afterwards
    torch.testing.assert_close(steerer.next_token_probs(tokens), before)
    out = steerer.generate(tokens, 4, [cases[0][0]])
    assert out.shape == (1, 4)


def test_parse_feature_and_bad_input():
    assert parse_feature("L7/F106") == (7, 106)
    with pytest.raises(ValueError, match="L<layer>/F<index>"):
        parse_feature("7:106")
    with pytest.raises(ValueError, match="exactly one"):
        Intervention(1, 2)
