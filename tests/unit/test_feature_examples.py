"""The streaming feature-examples pass against a brute-force recomputation over all the text at
once: top contexts (values, which contexts, their tokens and per-token activations), densities,
maxima and histograms; the decoder's top logits against an explicit per-feature computation; the
circuit-tracer ``features/`` files against its UI's schema (its pydantic model)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.metrics.feature_examples import (
    HIST_BINS,
    FeatureExamplesAccumulator,
    decoder_logits,
)
from torchtitan_clt.metrics.feature_files import cantor, write_feature_examples

L, D, F, K, B, T, N_BATCHES = 3, 8, 12, 4, 5, 9, 6


def model(family="clt"):
    m = tiny_model(family, "relu", L=L, d=D, F=F, seed=2)
    with torch.no_grad():
        m.b_enc.copy_(-0.3 + 0.2 * torch.randn(m.b_enc.shape, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def data():
    g = torch.Generator().manual_seed(0)
    toks = [torch.randint(0, 50, (B, T), generator=g) for _ in range(N_BATCHES)]
    xs = [torch.randn(B * (T - 1), L, D, generator=g) for _ in range(N_BATCHES)]
    return toks, xs


@pytest.mark.parametrize("family", ["clt", "plt"])
def test_streaming_equals_brute_force(family):
    m = model(family)
    toks, xs = data()
    acc = FeatureExamplesAccumulator(m, n_examples=K)
    for t, x in zip(toks, xs):
        acc.update(t, x)
    ex = acc.result()

    all_tok = torch.cat(toks)  # [C, T]
    with torch.no_grad():
        acts = m.encode(torch.cat(xs)).reshape(len(all_tok), T - 1, L * F)  # [C, T-1, LF]
    C = acts.shape[0]
    assert ex.tokens_seen == C * (T - 1)
    torch.testing.assert_close(ex.density, (acts > 0).double().mean((0, 1)))
    torch.testing.assert_close(ex.act_max, acts.amax((0, 1)))
    ctx_max = acts.amax(1)  # [C, LF]
    checked = 0
    for f in range(L * F):
        order = sorted((c for c in range(C) if ctx_max[c, f] > 0), key=lambda c: -float(ctx_max[c, f]))[:K]
        got = [int(c) for c in ex.top_context[f] if c >= 0]
        assert got == order, f
        for slot, c in enumerate(order):
            assert float(ex.top_values[f, slot]) == pytest.approx(float(ctx_max[c, f]))
            assert torch.equal(ex.top_tokens[f, slot], all_tok[c])
            torch.testing.assert_close(ex.top_acts[f, slot], acts[c, :, f])
        assert torch.all(ex.top_values[f, len(order) :] == 0)
        checked += len(order)
        # Histogram of the non-zero activations over [0, hist_top] in HIST_BINS equal bins.
        v = acts[:, :, f][acts[:, :, f] > 0]
        if v.numel():
            top = float(ex.hist_top[f])
            assert top >= float(v.max()) and top / 2 < float(v.max())
            expect = torch.bincount(
                (v / top * HIST_BINS).long().clamp(max=HIST_BINS - 1), minlength=HIST_BINS
            )
            assert torch.equal(ex.hist[f], expect), f
        else:
            assert ex.hist[f].sum() == 0
    assert checked > L * F  # many features have several examples: the test is not vacuous
    assert (ex.fired == 0).any() or (ex.fired > 0).all()


def test_decoder_logits_against_explicit():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained("tests/assets/tiny_llama")
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg).eval()
    m = tiny_model("clt", "relu", L=2, d=cfg.hidden_size, F=5, seed=4).eval()
    top, bottom = decoder_logits(m, llm, k=3)
    W_U, norm = llm.lm_head.weight, llm.model.norm
    for s in range(2):
        for i in range(5):
            direction = sum(m.W_dec[s][i, o] for o in range(2 - s))  # its writes to every target
            logits = W_U @ norm(direction[None, None])[0, 0]
            assert top[s, i].tolist() == logits.topk(3).indices.tolist()
            assert bottom[s, i].tolist() == (-logits).topk(3).indices.tolist()


class FakeTokenizer:
    def decode(self, ids):
        return "".join(f"<t{i}>" if i % 7 else " \n" for i in ids)


def test_circuit_tracer_feature_files(tmp_path):
    fm = pytest.importorskip("circuit_tracer.frontend.feature_models")
    m = model()
    toks, xs = data()
    acc = FeatureExamplesAccumulator(m, n_examples=K)
    for t, x in zip(toks, xs):
        acc.update(t, x)
    ex = acc.result()
    layers = [2, 5, 7]  # LLM layers of the dictionary's layers 0..2
    top = torch.randint(0, 50, (L, F, 4))
    summary = write_feature_examples(
        ex, tmp_path / "features", layers, FakeTokenizer(), top, top, {"name": "t"}
    )
    fired = (ex.fired > 0).nonzero().flatten().tolist()
    assert summary["fired"] == len(fired) > 0
    files = sorted(p.name for p in (tmp_path / "features").glob("[0-9]*.json"))
    expect = sorted(f"{cantor(layers[f // F], f % F)}.json" for f in fired)
    assert files == expect
    f = fired[0]
    rec = json.loads((tmp_path / "features" / expect[0]).read_text())
    fm.Model(**rec)  # circuit-tracer's own schema for these files
    doc = json.loads((tmp_path / "features" / f"{cantor(layers[f // F], f % F)}.json").read_text())
    assert doc["activation_frequency"] == pytest.approx(float(ex.density[f]))
    best = doc["examples_quantiles"][0]["examples"][0]
    assert max(best["tokens_acts_list"]) == pytest.approx(float(ex.top_values[f, 0]), abs=1e-4)
    assert best["tokens_acts_list"][best["train_token_ind"]] == max(best["tokens_acts_list"])
    assert len(doc["quantile_values"]) == 100 and sum(doc["histogram"]) == int(ex.fired[f])
    assert (tmp_path / "features" / "index.html").is_file()
    assert len(list((tmp_path / "features" / "pages").glob("*.html"))) == len(fired)
