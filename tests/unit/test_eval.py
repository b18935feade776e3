"""Replacement-model evaluation against hand computations and independent references.

- next-token metrics on a 2-prediction toy worked out by hand;
- an exact transcoder (encode = identity, decode = the LLM's own MLP) gives ΔCE 0, CE recovered 1,
  KL 0, top-1 agreement 1 (Llama: bias-free MLP; GPT-2: MLP with biases);
- a zero PLT gives exactly the zero-ablation numbers (closed and open loop);
- a random CLT's closed loop equals a fixed-point reference built from the CLT's own forward;
- a one-layer dictionary's closed loop equals its open loop; an SAE splices at its own hook.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.hooks import decoder_layers, hook_module, output_tensor
from torchtitan_clt.data.llm import load_llm
from torchtitan_clt.metrics import splice
from torchtitan_clt.metrics.eval import (
    NextTokenSums,
    SpliceSpec,
    ce_recovered,
    compute_baselines,
    evaluate_replacement,
    flat_metrics,
    forward_replaced,
    hook_out_means,
    is_cross_layer,
)
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def llama():
    return load_llm(str(ASSETS / "tiny_llama"), "float32", "cpu")[0]


@pytest.fixture(scope="module")
def llama_baselines(llama):
    """Baselines of all four layers of the tiny Llama on ``_batches(n=1)`` (shared: they cost 10
    forwards)."""
    return compute_baselines(llama, _batches(n=1), SpliceSpec([0, 1, 2, 3], "mlp_in", "mlp_out"))


@pytest.fixture(scope="module")
def gpt2():
    return load_llm(str(ASSETS / "tiny_gpt2"), "float32", "cpu")[0]


def _batches(n=2, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(3, 259, (b, t), generator=g)
        tok[:, 0] = 0  # BOS
        out.append(tok)
    return out


class ExactMLP(Transcoder):
    """Features = the MLP's input itself; decode = the LLM's own MLP of layer l (test only)."""

    def __init__(self, llm, layers, hook_in="mlp_in", hook_out="mlp_out", identity=False):
        d = llm.get_input_embeddings().embedding_dim
        args = TranscoderArgs(
            family="exact",
            n_layers=len(layers),
            d_in=d,
            d_out=d,
            features_per_layer=d,
            hook_in=hook_in,
            hook_out=hook_out,
            layers=list(layers),
        )
        super().__init__(args)
        blocks = decoder_layers(llm)
        # identity=True: decode is the identity (an exact SAE of its own hook).
        # .forward, not __call__: the evaluation hooks on these modules must not fire inside decode.
        self.fns = [(lambda a: a) if identity else blocks[layer].mlp.forward for layer in layers]

    def encode(self, x):
        return x.clone()

    def decode(self, acts):
        return torch.stack([fn(acts[:, i]) for i, fn in enumerate(self.fns)], dim=1)


def _build(family, layers, d=64, F_=32, seed=0, act="relu", zero=False, **kw):
    args = TranscoderArgs(
        family=family,
        n_layers=len(layers),
        d_in=d,
        d_out=d,
        features_per_layer=F_,
        activation=act,
        layers=list(layers),
        **kw,
    )
    m = model_registry.get(family).build_fn(args)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in m.parameters():
            if zero:
                p.zero_()
            elif p.dim() >= 2:
                p.mul_(3.0)  # writes large enough to move the logits
        if not zero:
            m.b_enc.copy_(0.2 * torch.randn(m.b_enc.shape, generator=g))
            m.b_dec.copy_(0.1 * torch.randn(m.b_dec.shape, generator=g))
            if getattr(m, "W_skip", None) is not None:  # zero at init: make the skip path write
                m.W_skip.copy_(0.2 * torch.randn(m.W_skip.shape, generator=g))
    if not zero:  # standardization buffers in play: the fast paths must apply them too
        L = len(layers)
        m.set_standardization(
            0.1 * torch.randn(L, d, generator=g),
            0.5 + torch.rand(L, 1, generator=g),
            0.1 * torch.randn(L, d, generator=g),
            0.5 + torch.rand(L, d, generator=g),
        )
    return m.eval()


# --- metrics by hand -----------------------------------------------------------------------------
def test_next_token_metrics_by_hand():
    # One row [BOS, a, b, c]: scored predictions are position 1 (-> token b=1) and 2 (-> c=0);
    # position 0's prediction and the last position are not scored.
    tokens = torch.tensor([[0, 2, 1, 0]])
    clean = torch.full((1, 4, 3), 99.0)  # unscored positions: garbage that must not matter
    other = torch.full((1, 4, 3), -99.0)
    clean[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0])  # p = [.2, .6, .2]
    clean[0, 2] = torch.tensor([math.log(4.0), 0.0, 0.0])  # p = [2/3, 1/6, 1/6]
    other[0, 1] = torch.tensor([0.0, 0.0, 0.0])  # q = [1/3]*3, argmax tie -> 0 (clean argmax 1)
    other[0, 2] = torch.tensor([0.0, 0.0, math.log(2.0)])  # q = [.25, .25, .5], argmax 2 (clean 0)
    s = NextTokenSums()
    s.update(clean, other, tokens)
    m = s.means()
    ce_hand = (-math.log(1 / 3) - math.log(0.25)) / 2
    p1, q1 = [0.2, 0.6, 0.2], [1 / 3] * 3
    p2, q2 = [2 / 3, 1 / 6, 1 / 6], [0.25, 0.25, 0.5]
    kl_hand = (
        sum(p * math.log(p / q) for p, q in zip(p1, q1)) + sum(p * math.log(p / q) for p, q in zip(p2, q2))
    ) / 2
    assert s.count == 2
    assert m["ce"] == pytest.approx(ce_hand, rel=1e-6)
    assert m["kl"] == pytest.approx(kl_hand, rel=1e-5)
    assert m["top1_agreement"] == 0.0
    s2 = NextTokenSums()
    s2.update(clean, clean, tokens)
    assert s2.means()["kl"] == pytest.approx(0.0, abs=1e-7)
    assert s2.means()["top1_agreement"] == 1.0
    assert s2.means()["ce"] == pytest.approx((-math.log(0.6) - math.log(2 / 3)) / 2, rel=1e-6)
    assert ce_recovered(3.0, 5.0, 1.0) == pytest.approx(0.5)
    assert ce_recovered(5.0, 5.0, 1.0) == 0.0
    assert math.isnan(ce_recovered(2.0, 1.0, 1.0))


def test_clean_ce_and_means_match_independent_computations(llama):
    batches = _batches()
    spec = SpliceSpec([0, 2], "resid_mid", "mlp_out")
    b = compute_baselines(llama, batches, spec, per_layer=False)
    with torch.no_grad():
        ce = torch.cat(
            [
                F.cross_entropy(
                    llama(input_ids=t).logits[:, 1:-1].reshape(-1, 320),
                    t[:, 2:].reshape(-1),
                    reduction="none",
                )
                for t in batches
            ]
        )
    assert b.clean_ce == pytest.approx(ce.mean().item(), rel=1e-6)
    ys = torch.cat([ActivationExtractor(llama, "resid_mid", "mlp_out", [0, 2])(t)[1] for t in batches])
    means = hook_out_means(llama, batches, spec)
    torch.testing.assert_close(means[0], ys[:, 0].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means[2], ys[:, 1].mean(0), rtol=1e-5, atol=1e-6)
    # Ablating changes the predictions: the baselines are not trivially equal to clean.
    assert b.zero["ce"] != pytest.approx(b.clean_ce, abs=1e-3)
    assert b.zero["kl"] > 1e-4 and b.mean["kl"] > 1e-5


# --- exact and zero dictionaries ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_exact_transcoder_recovers_everything(name, request):
    llm = request.getfixturevalue(name)
    tc = ExactMLP(llm, [0, 1, 2, 3])
    base = request.getfixturevalue("llama_baselines") if name == "llama" else None
    r = evaluate_replacement(llm, tc, _batches(n=1), baselines=base)
    for res in [r["closed_loop"]] + [{k: v[i] for k, v in r["open_loop"].items()} for i in range(4)]:
        assert res["delta_ce"] == pytest.approx(0.0, abs=1e-5)
        assert res["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
        assert res["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-3)
        assert res["kl"] == pytest.approx(0.0, abs=1e-6)
        assert res["top1_agreement"] == 1.0
    assert r["tokens_scored"] == 2 * 10
    assert r["zero_ablation"]["ce_recovered_zero"] == 0.0
    assert r["mean_ablation"]["ce_recovered_mean"] == 0.0
    assert r["closed_loop"]["ce"] == pytest.approx(r["ce_clean"], abs=1e-5)


def test_zero_transcoder_gives_zero_ablation(llama, llama_baselines):
    tc = _build("plt", [0, 1, 2, 3], zero=True, hook_in="mlp_in")
    r = evaluate_replacement(llama, tc, _batches(n=1), baselines=llama_baselines)
    c, z = r["closed_loop"], r["zero_ablation"]
    for k in ("ce", "kl", "top1_agreement"):
        assert c[k] == pytest.approx(z[k], rel=1e-5, abs=1e-6)
    assert c["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-5)
    o = r["open_loop"]
    for i in range(4):
        assert o["ce"][i] == pytest.approx(o["ce_zero_ablation"][i], rel=1e-5)
        assert o["ce_recovered_zero"][i] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_gemma2", "tiny_qwen3"])
def test_sae_spliced_at_its_own_hook(name):
    # Every architecture's block output (a tensor or a tuple, by version) and mlp_out hook.
    llm = load_llm(str(ASSETS / name), "float32", "cpu")[0]
    d = llm.get_input_embeddings().embedding_dim
    exact = ExactMLP(llm, [1, 3], hook_in="resid_post", hook_out="resid_post", identity=True)
    r = evaluate_replacement(llm, exact, _batches(n=1), open_loop=False)
    assert r["closed_loop"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["closed_loop"]["top1_agreement"] == 1.0
    zero = _build("sae", [1, 3], d=d, zero=True, hook_in="resid_post", hook_out="resid_post")
    rz = evaluate_replacement(llm, zero, _batches(n=1), open_loop=False)
    assert rz["closed_loop"]["ce"] == pytest.approx(rz["zero_ablation"]["ce"], rel=1e-6)
    assert rz["zero_ablation"]["kl"] > 0.01
    zero_mlp = _build("plt", [0, 2], d=d, zero=True)  # resid_mid -> mlp_out
    rm = evaluate_replacement(llm, zero_mlp, _batches(n=1), open_loop=False)
    assert rm["closed_loop"]["kl"] == pytest.approx(rm["zero_ablation"]["kl"], rel=1e-5)
    assert rm["zero_ablation"]["kl"] > 1e-5


# --- the CLT's closed loop against a fixed-point reference --------------------------------------
def _reference_closed_loop(llm, clt, tokens):
    """Layer by layer: run the LLM with the targets found so far spliced in, read the next input,
    compute that layer's target with the CLT's own full forward. Then one final spliced forward."""
    a = clt.args
    L, d = a.n_layers, a.d_in
    B, T = tokens.shape
    X = torch.zeros(B * T, L, d)
    y_fixed: dict[int, torch.Tensor] = {}

    def run(capture_layer=None):
        handles, store = [], {}
        for i, layer in enumerate(a.layers):
            mod_out, _ = hook_module(llm, layer, a.hook_out)
            if i in y_fixed:

                def post(m, args, out, i=i):
                    t = output_tensor(out)
                    new = y_fixed[i].view_as(t).clone()
                    new[:, 0] = t[:, 0]  # BOS keeps its clean activation
                    return new

                handles.append(mod_out.register_forward_hook(post))
        if capture_layer is not None:
            mod_in, _ = hook_module(llm, a.layers[capture_layer], a.hook_in)
            handles.append(mod_in.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0])))
        try:
            with torch.no_grad():
                logits = llm(input_ids=tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, store.get("x")

    for t in range(L):
        _, x = run(capture_layer=t)
        X[:, t] = x.reshape(-1, d)
        with torch.no_grad():
            y_fixed[t] = clt(X)[:, t]  # layers > t of X are still zero: they cannot reach target t
    return run()[0]


FAMILIES = {
    "clt": dict(act="relu"),
    "matryoshka_clt": dict(act="topk", k=4),
    "plt": dict(act="relu"),
    "molt": dict(act="relu", extra={"molt_ranks": [4, 2]}),
    # model.skip_connection: the spliced target gains the linear path from its own layer's input
    "clt+skip": dict(act="relu", skip_connection=True),
    "matryoshka_clt+skip": dict(act="topk", k=4, skip_connection=True),
    "plt+skip": dict(act="relu", skip_connection=True),
}


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("case", list(FAMILIES))
def test_closed_loop_matches_fixed_point_reference(llama, case, fast, monkeypatch):
    monkeypatch.setattr(splice, "FAST_PATHS", fast)
    family = case.split("+")[0]
    clt = _build(family, [0, 1, 3], seed=3, **FAMILIES[case])
    assert is_cross_layer(clt) == (family in ("clt", "matryoshka_clt"))
    ops = splice._LayerOps(clt)
    assert (ops.clt or ops.plt) == (fast and family != "molt")
    spec = SpliceSpec.of(clt, llama)
    tokens = _batches(n=1, b=2, t=10, seed=5)[0]
    got = forward_replaced(llama, tokens, clt, spec, [0, 1, 2], chunk_elements=7 * 3 * 64)  # chunked
    ref = _reference_closed_loop(llama, clt, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        clean = llama(input_ids=tokens).logits
    assert (got - clean)[:, 1:].abs().max() > 1e-2  # the splice did change something
    torch.testing.assert_close(got[:, 0], clean[:, 0])  # ... but never at BOS


def test_single_layer_dictionary_open_equals_closed(llama):
    clt = _build("clt", [2], seed=1)
    clt.train()
    r = evaluate_replacement(llama, clt, _batches())
    assert clt.training  # mode restored
    for k, v in r["closed_loop"].items():
        assert r["open_loop"][k][0] == pytest.approx(v, rel=1e-6, abs=1e-7)
    assert r["closed_loop"]["kl"] > 1e-4  # a random dictionary is not exact
    assert r["zero_ablation"]["ce"] == pytest.approx(r["open_loop"]["ce_zero_ablation"][0], rel=1e-6)
    flat = flat_metrics(r)
    assert flat["eval_kl"] == r["closed_loop"]["kl"]
    assert flat["eval_open_ce_recovered_zero_per_layer"] == r["open_loop"]["ce_recovered_zero"]


def test_bad_splices_are_refused(llama):
    tc = _build("plt", [0], hook_in="resid_post", hook_out="mlp_out")
    with pytest.raises(ValueError, match="comes after"):
        SpliceSpec.of(tc, llama)
    with pytest.raises(ValueError, match="the LLM it was trained on"):
        SpliceSpec.of(_build("plt", [0], d=32), llama)


# --- MOLT: a decoder that reads its input ---------------------------------------------------------
def test_molt_through_the_cross_layer_path_matches_its_per_layer_splice(llama, monkeypatch):
    """A MOLT forced down the cross-layer path (decode(A_s, X_s) − decode(0, X_s) per source, plus
    decode(0, 0)) must give the per-layer splice's logits: its layer t reads x_t only."""
    monkeypatch.setattr(splice, "FAST_PATHS", False)
    molt = _build("molt", [0, 1, 3], seed=3, act="relu", extra={"molt_ranks": [4, 2]})
    spec = SpliceSpec.of(molt, llama)
    tokens = _batches(n=1, b=2, t=10, seed=5)[0]
    per_layer = forward_replaced(llama, tokens, molt, spec, [0, 1, 2])
    molt.cross_layer = True  # the instance attribute overrides the class's
    assert is_cross_layer(molt)
    crossed = forward_replaced(llama, tokens, molt, spec, [0, 1, 2], chunk_elements=7 * 3 * 64)
    torch.testing.assert_close(crossed, per_layer, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_layer, _reference_closed_loop(llama, molt, tokens), rtol=1e-4, atol=1e-4)


def test_evaluator_runs_a_molt(tmp_path):
    """The trainer's Evaluator on MOLTs: one whose gates never open and whose bias is 0 writes
    zeros, so its closed loop is the zero ablation and its FVU Σ‖y‖² / Σ‖y − ȳ‖² (float64 by
    hand); a random one runs through open and closed loop with finite, non-trivial numbers."""
    from torchtitan_clt.config import JobConfig
    from torchtitan_clt.metrics.evaluator import Evaluator

    cfg = JobConfig()
    cfg.data.model_path, cfg.data.model_dtype, cfg.data.seq_len = str(ASSETS / "tiny_llama"), "float32", 12
    cfg.eval.dataset, cfg.eval.tokens, cfg.eval.batch_size = str(ASSETS / "tiny_text.txt"), 48, 2
    ev = Evaluator(cfg, "cpu")
    silent = _build("molt", [0, 1, 2], act="relu", hook_in="mlp_in", extra={"molt_ranks": [4, 2]})
    with torch.no_grad():
        silent.b_enc.fill_(-1e4)  # ReLU gates: all zero
        silent.b_dec.zero_()
        silent.reset_standardization()  # raw output = b_dec = 0
    r = ev.run(silent, step=0, open_loop=True)
    c, z = r["replacement"]["closed_loop"], r["replacement"]["zero_ablation"]
    assert c["ce"] == pytest.approx(z["ce"], rel=1e-5) and c["kl"] == pytest.approx(z["kl"], rel=1e-5)
    assert r["feature_stats"]["l0"] == 0.0
    ex = ActivationExtractor(ev.llm.model, "mlp_in", "mlp_out", [0, 1, 2])
    y = torch.cat([ex(t)[1] for t in ev.batches]).double()  # [N, L, d]
    fvu = (y.pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))).tolist()
    assert r["feature_stats"]["fvu_per_layer"] == pytest.approx(fvu, rel=1e-4)

    molt = _build("molt", [0, 1, 2], act="relu", hook_in="mlp_in", extra={"molt_ranks": [4, 2]})
    r = ev.run(molt, step=1, open_loop=True)
    c = r["replacement"]["closed_loop"]
    assert math.isfinite(c["ce"]) and c["kl"] > 1e-4 and len(r["replacement"]["open_loop"]["ce"]) == 3
    assert r["feature_stats"]["l0"] > 0
