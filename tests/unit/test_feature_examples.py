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
    decoder_target_norms,
    drop_duplicates,
    nearest_features,
)
from torchtitan_clt.metrics.feature_files import (
    cantor,
    feature_label,
    feature_labels,
    label_from_examples,
    label_graph_nodes,
    write_feature_examples,
)

L, D, F, K, B, T, N_BATCHES = 3, 8, 12, 4, 5, 9, 6


def model(family="clt"):
    m = tiny_model(family, "relu", L=L, d=D, F=F, seed=2)
    with torch.no_grad():
        m.b_enc.copy_(-0.3 + 0.2 * torch.randn(m.b_enc.shape, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def data(dup_every=0):
    """Token windows and their rows; with ``dup_every``, every such context repeats an earlier one
    exactly (tokens and activations): an exact duplicate the selection must drop."""
    g = torch.Generator().manual_seed(0)
    toks = [torch.randint(0, 50, (B, T), generator=g) for _ in range(N_BATCHES)]
    xs = [torch.randn(B * (T - 1), L, D, generator=g) for _ in range(N_BATCHES)]
    if dup_every:
        for n in range(1, N_BATCHES):
            for b in range(0, B, dup_every):
                src = (n * 7 + b) % (n * B)  # an earlier context
                toks[n][b] = toks[src // B][src % B]
                xs[n].view(B, T - 1, L, D)[b] = xs[src // B].view(B, T - 1, L, D)[src % B]
    return toks, xs


def brute_force_top(acts, tokens, skip, k):
    """Per feature, the contexts of the k highest peaks over positions > skip (window positions
    skip+1..T-1), an exact repeat of a kept (peak token, peak value) dropped (the earliest kept)."""
    C = acts.shape[0]
    value, peak = acts[:, skip:].max(1)  # [C, LF]
    peak = peak + skip
    out = []
    for f in range(acts.shape[2]):
        seen, order = set(), []
        for c in sorted(range(C), key=lambda c: (-float(value[c, f]), c)):
            v = float(value[c, f])
            key = (v, int(tokens[c, 1 + peak[c, f]]))
            if v <= 0 or key in seen:
                continue
            seen.add(key)
            order.append(c)
        out.append(order[:k])
    return value, peak, out


@pytest.mark.parametrize("family,skip,dup", [("clt", 0, 0), ("plt", 2, 3), ("clt", 4, 2)])
def test_streaming_equals_brute_force(family, skip, dup):
    m = model(family)
    toks, xs = data(dup)
    acc = FeatureExamplesAccumulator(m, n_examples=K, skip_positions=skip)
    for t, x in zip(toks, xs):
        acc.update(t, x)
    ex = acc.result()

    all_tok = torch.cat(toks)  # [C, T]
    with torch.no_grad():
        acts = m.encode(torch.cat(xs)).reshape(len(all_tok), T - 1, L * F)  # [C, T-1, LF]
    C = acts.shape[0]
    assert ex.tokens_seen == C * (T - 1)
    torch.testing.assert_close(ex.density, (acts > 0).double().mean((0, 1)))
    torch.testing.assert_close(ex.act_max, acts.amax((0, 1)))  # the true max, skipped positions too
    value, peak, best = brute_force_top(acts, all_tok, skip, K)
    checked = dropped = 0
    for f in range(L * F):
        order = best[f]
        got = [int(c) for c in ex.top.context[f] if c >= 0]
        assert got == order, f
        for slot, c in enumerate(order):
            assert float(ex.top.values[f, slot]) == pytest.approx(float(value[c, f]))
            assert int(ex.top.peak[f, slot]) == int(peak[c, f]) >= skip
            assert torch.equal(ex.top.tokens[f, slot], all_tok[c])
            torch.testing.assert_close(ex.top.acts[f, slot], acts[c, :, f])
        assert torch.all(ex.top.values[f, len(order) :] == 0)
        checked += len(order)
        fired_ctx = int((value[:, f] > 0).sum())
        dropped += fired_ctx > len(order) and len(order) < K
        # The sample: distinct firing contexts (no exact repeat), values and peaks as recomputed.
        sampled = [int(c) for c in ex.sampled.context[f] if c >= 0]
        keys = {(float(value[c, f]), int(all_tok[c, 1 + peak[c, f]])) for c in sampled}
        distinct = {
            (float(value[c, f]), int(all_tok[c, 1 + peak[c, f]])) for c in range(C) if value[c, f] > 0
        }
        assert len(keys) == len(sampled) == min(2 * K, len(distinct))
        for slot, c in enumerate(ex.sampled.context[f].tolist()):
            if c >= 0:
                assert float(value[c, f]) > 0
                assert float(ex.sampled.values[f, slot]) == pytest.approx(float(value[c, f]))
                torch.testing.assert_close(ex.sampled.acts[f, slot], acts[c, :, f])
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
    assert checked > L * F // 2, checked  # many features have several examples: the test is not vacuous
    if dup:
        assert dropped > 0  # some feature had fewer examples than firing contexts: repeats dropped


def test_duplicates_dropped_by_peak_token_and_value():
    """Hand-worked: one feature, peaks (value, token) = (3, 7), (3, 7), (3, 8), (2, 7): the
    second is dropped, the rest kept in order of value (ties: arrival)."""
    score = torch.tensor([[3.0, 3.0, 3.0, 2.0]])
    out = drop_duplicates(score, score.clone(), torch.tensor([[7, 7, 8, 7]]))
    assert out.tolist() == [[3.0, 0.0, 3.0, 2.0]]
    # Of a repeated pair, the better-scored one stays (a random sample's larger key).
    out = drop_duplicates(torch.tensor([[0.25, 0.75]]), torch.tensor([[3.0, 3.0]]), torch.tensor([[7, 7]]))
    assert out.tolist() == [[0.0, 0.75]]


def test_sample_is_uniform_over_firing_contexts():
    """Every firing context is about equally likely to be sampled: 400 identical features (each
    its own random keys) firing everywhere with one value, 40 contexts, 4 kept per feature: each
    context ~40 times (binomial sd 6)."""
    m = tiny_model("sae", "relu", L=1, d=4, F=400, seed=0).eval()
    with torch.no_grad():
        m.W_enc.zero_()
        m.b_enc.fill_(1.0)  # fires on every token with the same value ...
    acc = FeatureExamplesAccumulator(m, n_examples=1, skip_positions=0, n_sampled=4)
    for n in range(4):
        t = torch.arange(10 * n, 10 * n + 10)[:, None].expand(10, 3)  # ... but distinct peak tokens
        acc.update(t, torch.zeros(10 * 2, 1, 4))
    counts = torch.bincount(acc.result().sampled.context.flatten(), minlength=40)
    assert counts.sum() == 1600 and counts.min() > 15 and counts.max() < 70


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
    acc = FeatureExamplesAccumulator(m, n_examples=K, skip_positions=1)
    for t, x in zip(toks, xs):
        acc.update(t, x)
    ex = acc.result()
    layers = [2, 5, 7]  # LLM layers of the dictionary's layers 0..2
    top = torch.randint(0, 50, (L, F, 4))
    targets = decoder_target_norms(m)
    summary = write_feature_examples(
        ex,
        tmp_path / "features",
        layers,
        FakeTokenizer(),
        top,
        top,
        {"name": "t"},
        targets,
        nearest_features(m, 3),
    )
    fired = (ex.fired > 0).nonzero().flatten().tolist()
    assert summary["fired"] == len(fired) > 0
    assert summary["top_example_after_bos_frac"] == 0  # position 1 is skipped
    files = sorted(p.name for p in (tmp_path / "features").glob("[0-9]*.json"))
    expect = sorted(f"{cantor(layers[f // F], f % F)}.json" for f in fired)
    assert files == expect
    labels = feature_labels(tmp_path / "features")
    assert len(labels) == len(fired)  # every fired feature has a label
    for f in fired:
        doc = json.loads((tmp_path / "features" / f"{cantor(layers[f // F], f % F)}.json").read_text())
        fm.Model(**doc)  # circuit-tracer's own schema for these files
        assert doc["activation_frequency"] == pytest.approx(float(ex.density[f]))
        assert doc["act_max"] == pytest.approx(float(ex.act_max[f]), abs=1e-4)  # the true max
        best = doc["examples_quantiles"][0]["examples"][0]
        assert max(best["tokens_acts_list"][best["train_token_ind"] :]) == pytest.approx(
            float(ex.top.values[f, 0]), abs=1e-4
        )
        assert best["tokens_acts_list"][best["train_token_ind"]] == pytest.approx(
            float(ex.top.values[f, 0]), abs=1e-4
        )
        assert len(doc["quantile_values"]) == 100 and sum(doc["histogram"]) == int(ex.fired[f])
        # The label starts with a token one of its examples peaks at.
        peak_toks = {
            e["tokens"][e["train_token_ind"]] for q in doc["examples_quantiles"] for e in q["examples"]
        }
        first = doc["label"].split('"')[1]
        assert any(first == t.strip() or (first == "\\n" and t.strip() == "") for t in peak_toks), doc[
            "label"
        ]
        assert feature_label(tmp_path, layers[f // F], f % F) == doc["label"]
    # Quantile bands: the random sample, sorted by activation across the bands.
    f = max(fired, key=lambda f: int((ex.sampled.context[f] >= 0).sum()))
    doc = json.loads((tmp_path / "features" / f"{cantor(layers[f // F], f % F)}.json").read_text())
    bands = doc["examples_quantiles"][1:]
    assert len(bands) >= 2 and bands[0]["quantile_name"].startswith("Quantile")
    peaks = [e["tokens_acts_list"][e["train_token_ind"]] for b in bands for e in b["examples"]]
    assert peaks == sorted(peaks, reverse=True) and len(peaks) == int((ex.sampled.context[f] >= 0).sum())
    assert feature_label(tmp_path, 99, 0) is None
    assert (tmp_path / "features" / "index.html").is_file()
    assert len(list((tmp_path / "features" / "data").glob("*.js"))) == len(fired)


def test_label_from_examples_hand_worked():
    """Peak tokens ranked by count (plus activation / max as the tie-break), then the outputs."""

    def ex(tok, v):
        return {"tokens": ["a", tok, "b"], "center": 1, "max": v}

    record = {
        "act_max": 4.0,
        "examples": [ex(" king", 4.0), ex(" queen", 3.0), ex(" king", 2.0)],
        "bands": [{"examples": [ex(" lord", 1.0), ex(" queen", 0.5), ex("\n", 0.5)]}],
        "top_logits": ["'s", " dom", " x"],
    }
    # king 2 + 1.5, queen 2 + 0.875, lord 1.25, \n 1.125
    assert label_from_examples(record) == '"king" "queen" "lord" \u2192 "\'s" "dom"'
    assert label_from_examples({**record, "top_logits": []}, n_in=1) == '"king"'


def test_target_norms_and_neighbours_against_explicit():
    m = model()
    t = decoder_target_norms(m)
    for s in range(L):
        for i in range(F):
            for o in range(L - s):
                assert float(t[s, i, s + o]) == pytest.approx(
                    float(m.W_dec[s][i, o].detach().norm()), rel=1e-5
                )
            assert torch.all(t[s, i, :s] == 0)
    rows, cos = nearest_features(m, k=3)
    dirs = torch.stack([sum(m.W_dec[s][:, o] for o in range(L - s)) for s in range(L)]).reshape(L * F, D)
    for f in range(L * F):
        sim = torch.nn.functional.cosine_similarity(dirs[f][None], dirs, dim=1)
        sim[f] = -2
        assert rows[f].tolist() == sim.topk(3).indices.tolist()
        torch.testing.assert_close(cos[f], sim.topk(3).values, rtol=1e-4, atol=1e-5)
    assert nearest_features(m, max_features=L * F - 1) is None


def test_label_graph_nodes(tmp_path):
    """Every transcoder node of a graph JSON gets its feature file's label as its clerp."""
    feats = tmp_path / "features"
    feats.mkdir()
    for fid, label in ((5, '"the" -> "king"'), (9, '"a"')):
        (feats / f"{fid}.json").write_text(json.dumps({"label": label}))
    nodes = [
        {"feature_type": "cross layer transcoder", "feature": 5, "clerp": ""},
        {"feature_type": "cross layer transcoder", "feature": 9, "clerp": ""},
        {"feature_type": "logit", "feature": 5, "clerp": 'Output "x"'},
    ]
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"nodes": nodes}))
    assert label_graph_nodes(g, feats) == 2
    got = [n["clerp"] for n in json.loads(g.read_text())["nodes"]]
    assert got == ['"the" -> "king"', '"a"', 'Output "x"']
