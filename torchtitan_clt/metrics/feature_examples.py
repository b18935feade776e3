"""Feature examples: what each feature responds to, from one streaming pass over held-out text.

    acc = FeatureExamplesAccumulator(transcoder, n_examples=8, skip_positions=4)
    for tokens in batches:                        # [B, T] token ids, BOS at position 0
        acc.update(tokens, *extractor(tokens))    # x [B*(T-1), L, d] raw units (BOS dropped)
    ex = acc.result()

Per feature (layer j of the dictionary, index i):

- top examples: the ``n_examples`` contexts where its largest *eligible* activation is highest (a
  context enters once, ranked by that maximum), with the per-token activations over the whole
  context. Eligible positions exclude the first ``skip_positions`` tokens after BOS: a token there
  sees almost no context (position 1 sees only BOS and itself, and in most LLMs it is an attention
  sink with outsized activations), so it shows a token, not a feature. A context whose peak (token,
  activation) equals one already kept is an exact duplicate and is dropped (repeated text, or the
  same token at a position that cannot see its context);
- a uniform random sample of ``n_sampled`` contexts among those where it fires (eligible positions,
  duplicates dropped the same way): a random key per (context, feature) and the largest keys kept,
  which is a uniform sample without replacement that merges batch by batch. Sorted by activation
  it shows the feature below its top (the quantile bands of ``feature_files``);
- its density (fraction of tokens on which it fires), its true maximum (over every position), and
  a histogram of its non-zero activations over ``[0, hist_top]`` (the top doubles when an
  activation exceeds it, merging bins pairwise, so no second pass is needed).

Memory is ``O(features × (n_examples + n_sampled) × T)``, independent of the amount of text.

``decoder_logits`` gives the tokens each feature's decoder promotes (and suppresses) through the
LLM's final norm and unembedding: the direct path from its write to the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HIST_BINS = 32
# Window positions after BOS left out of example selection. Position 1 sees only BOS and itself;
# positions 2-4 see one to three tokens: too little context to show what a feature reads.
# Costs 4/127 of the positions of a 128-token window.
DEFAULT_SKIP_POSITIONS = 4
# Nearest neighbours by decoder cosine are computed up to this many features (all pairs, on the
# CPU: ~2e13 multiply-adds at 65,536 features of width 2,304).
MAX_NEIGHBOUR_FEATURES = 65_536


@dataclass
class ExampleSlots:
    """K contexts kept per feature; ``LF`` rows. Unused slots have value 0 and context -1."""

    values: torch.Tensor  # [LF, K] the context's peak activation over eligible positions
    context: torch.Tensor  # [LF, K] context number (order of arrival), -1 unused
    peak: torch.Tensor  # [LF, K] index of the peak in ``acts`` (window position - 1)
    tokens: torch.Tensor  # [LF, K, T] token ids of the context (BOS included)
    acts: torch.Tensor  # [LF, K, T-1] per-token activations (positions 1..T-1)


@dataclass
class FeatureExamples:
    """Everything ``FeatureExamplesAccumulator.result`` found; ``LF = n_layers × F`` rows, feature
    ``(j, i)`` at row ``j * F + i``."""

    n_layers: int
    n_features: int
    tokens_seen: int
    skip_positions: int
    fired: torch.Tensor  # [LF] tokens on which the feature fired
    act_max: torch.Tensor  # [LF] over every position (the skipped ones too)
    top: ExampleSlots  # descending by value
    sampled: ExampleSlots  # uniform among firing contexts, in no particular order
    hist: torch.Tensor  # [LF, HIST_BINS] counts of non-zero activations over [0, hist_top]
    hist_top: torch.Tensor  # [LF]

    @property
    def density(self) -> torch.Tensor:
        return self.fired.double() / max(self.tokens_seen, 1)


def drop_duplicates(score: torch.Tensor, value: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``score``  # [R, N] with 0 (unused) at every candidate whose (value, key) pair equals a
    candidate of higher score in its row: one per exact duplicate, the best-scored kept."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(key.gather(1, order), dim=1, stable=True).indices)
    order = order.gather(1, torch.sort(value.gather(1, order), dim=1, stable=True).indices)
    v, k = value.gather(1, order), key.gather(1, order)
    dup = torch.zeros_like(v, dtype=torch.bool)
    dup[:, 1:] = (v[:, 1:] == v[:, :-1]) & (k[:, 1:] == k[:, :-1]) & (v[:, 1:] > 0)
    return score.masked_fill(torch.zeros_like(dup).scatter(1, order, dup), 0.0)


class _Kept:
    """The running K best-scored contexts of every feature (``ExampleSlots`` plus the scores and
    the peak tokens that identify duplicates)."""

    def __init__(self, LF: int, K: int):
        self.K = K
        self.score = torch.zeros(LF, K)
        self.values = torch.zeros(LF, K)
        self.context = torch.full((LF, K), -1, dtype=torch.int64)
        self.peak = torch.zeros(LF, K, dtype=torch.int64)
        self.peak_tok = torch.full((LF, K), -1, dtype=torch.int64)
        self.tokens: torch.Tensor | None = None  # [LF, K, T], allocated on the first batch
        self.acts: torch.Tensor | None = None  # [LF, K, T-1]

    def merge(self, score, values, peak, peak_tok, tokens, acts, first_context: int) -> None:
        """Candidates of one batch: ``score`` / ``values`` / ``peak`` / ``peak_tok``  # [B, LF];
        tokens  # [B, T]; acts  # [B, T-1, LF]."""
        K, T = self.K, tokens.shape[1]
        if self.tokens is None:
            self.tokens = torch.zeros(self.score.shape[0], K, T, dtype=torch.int64)
            self.acts = torch.zeros(self.score.shape[0], K, T - 1)
        cand = drop_duplicates(
            torch.cat([self.score, score.T], 1),
            torch.cat([self.values, values.T], 1),
            torch.cat([self.peak_tok, peak_tok.T], 1),
        )  # [LF, K + B]
        best, pick = torch.topk(cand, K, dim=1)  # ties between 0s do not matter: 0 means unused
        old = pick < K
        keep = pick.clamp(max=K - 1)  # slots taken from the old ones (the others overwritten)
        b = (pick - K).clamp(min=0)
        rows = torch.arange(cand.shape[0])[:, None]
        self.values = torch.where(old, self.values.gather(1, keep), values.T[rows, b])
        self.peak = torch.where(old, self.peak.gather(1, keep), peak.T[rows, b])
        self.peak_tok = torch.where(old, self.peak_tok.gather(1, keep), peak_tok.T[rows, b])
        self.context = torch.where(old, self.context.gather(1, keep), first_context + b)
        self.tokens = self.tokens.gather(1, keep[:, :, None].expand(-1, -1, T))
        self.acts = self.acts.gather(1, keep[:, :, None].expand(-1, -1, T - 1))
        f_idx, slot = (~old).nonzero(as_tuple=True)
        b_idx = b[f_idx, slot]
        self.tokens[f_idx, slot] = tokens[b_idx]
        self.acts[f_idx, slot] = acts[b_idx, :, f_idx]
        unused = best <= 0
        self.score = best.masked_fill(unused, 0.0)
        self.values = self.values.masked_fill(unused, 0.0)
        self.context = self.context.masked_fill(unused, -1)
        self.peak_tok = self.peak_tok.masked_fill(unused, -1)

    def slots(self, T: int) -> ExampleSlots:
        LF, K = self.score.shape
        tokens = self.tokens if self.tokens is not None else torch.zeros(LF, K, T, dtype=torch.int64)
        acts = self.acts if self.acts is not None else torch.zeros(LF, K, T - 1)
        return ExampleSlots(
            self.values.clone(), self.context.clone(), self.peak.clone(), tokens.clone(), acts.clone()
        )


def _i64(c: int) -> int:
    """A 64-bit constant as the int64 that has its bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def sample_keys(seed: int, context: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Uniform keys in [0, 1) per (context, feature) pair (broadcast): a hash of the pair
    (splitmix64), not a generator's stream, so it is the same whichever rank holds the feature
    and however many features it holds (a sharded pass samples what one process does)."""
    z = context.to(torch.int64) * _i64(0xD1B54A32D192ED03) + feature.to(torch.int64)
    z = z + seed * _i64(0xABC98388FB8FAC03) + _i64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _i64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) / float(1 << 24)  # the top 24 bits: exact in float32


class FeatureExamplesAccumulator:
    def __init__(
        self,
        transcoder: nn.Module,
        n_examples: int = 8,
        skip_positions: int = DEFAULT_SKIP_POSITIONS,
        n_sampled: int | None = None,
        seed: int = 0,
        feature_offset: int = 0,
        n_features_total: int | None = None,
    ):
        """``feature_offset`` / ``n_features_total``: ``transcoder`` holds features
        ``feature_offset..`` of each layer's ``n_features_total`` (a rank of a sharded pass); the
        random sample then draws the keys the whole dictionary's pass would."""
        self.tc = transcoder
        a = transcoder.args
        self.L, self.F, self.K = a.n_layers, a.features_per_layer, n_examples
        total = n_features_total or self.F
        self.seed = seed
        # Each feature's number in the whole dictionary (layer * total + index): its sample keys.
        self.feature_ids = (
            torch.arange(self.L)[:, None] * total + feature_offset + torch.arange(self.F)
        ).flatten()
        self.LF = self.L * self.F
        self.skip = skip_positions
        self.tokens_seen = 0
        self.contexts = 0
        self.T = 1
        self.fired = torch.zeros(self.LF, dtype=torch.int64)
        self.act_max = torch.zeros(self.LF)
        self.top = _Kept(self.LF, n_examples)
        self.sampled = _Kept(self.LF, 2 * n_examples if n_sampled is None else n_sampled)
        self.hist = torch.zeros(self.LF, HIST_BINS, dtype=torch.int64)
        self.hist_top = torch.zeros(self.LF)

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """tokens  # [B, T]; x  # [B*(T-1), L, d_in] raw, the rows of positions 1..T-1."""
        B, T = tokens.shape
        if self.skip >= T - 1:
            raise ValueError(
                f"eval.feature_skip_positions = {self.skip} leaves no position of a {T}-token window "
                f"to take examples from: set it below {T - 1} (data.seq_len - 1)."
            )
        self.T = T
        was_training = self.tc.training
        self.tc.eval()  # BatchTopK and friends: their per-token inference form
        try:
            ref = next(iter(self.tc.parameters()))
            acts = self.tc.encode(x.to(ref.device, torch.float32)).float().cpu()  # [B*(T-1), L, F]
        finally:
            self.tc.train(was_training)
        acts = acts.reshape(B, T - 1, self.LF)
        tokens = tokens.cpu()
        self.fired += (acts > 0).sum((0, 1))
        self.tokens_seen += B * (T - 1)
        self.act_max = torch.maximum(self.act_max, acts.amax((0, 1)))
        self._update_hist(acts)
        value, peak = acts[:, self.skip :].max(1)  # [B, LF] over the eligible positions
        peak += self.skip
        peak_tok = tokens[:, 1:].gather(1, peak)
        self.top.merge(value, value, peak, peak_tok, tokens, acts, self.contexts)
        key = sample_keys(self.seed, self.contexts + torch.arange(B)[:, None], self.feature_ids[None])
        key = key.clamp_min(1e-12).masked_fill(value <= 0, 0.0)
        self.sampled.merge(key, value, peak, peak_tok, tokens, acts, self.contexts)
        self.contexts += B

    def _update_hist(self, acts: torch.Tensor) -> None:
        batch_max = acts.amax((0, 1))  # [LF]
        grow = batch_max > self.hist_top
        fresh = grow & (self.hist_top == 0)
        # A first range: the next power of two above the first maximum.
        self.hist_top[fresh] = torch.exp2(torch.ceil(torch.log2(batch_max[fresh])))
        while bool((need := batch_max > self.hist_top).any()):
            h = self.hist[need]
            merged = h.view(h.shape[0], HIST_BINS // 2, 2).sum(2)
            self.hist[need] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.hist_top[need] *= 2
        flat = acts.reshape(-1, self.LF)
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        if cols.numel():
            v = flat[rows, cols]
            b = (v / self.hist_top[cols] * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
            self.hist.view(-1).index_add_(0, cols * HIST_BINS + b, torch.ones_like(b))

    def result(self) -> FeatureExamples:
        return FeatureExamples(
            n_layers=self.L,
            n_features=self.F,
            tokens_seen=self.tokens_seen,
            skip_positions=self.skip,
            fired=self.fired.clone(),
            act_max=self.act_max.clone(),
            top=self.top.slots(self.T),
            sampled=self.sampled.slots(self.T),
            hist=self.hist.clone(),
            hist_top=self.hist_top.clone(),
        )


def _final_norm(llm: nn.Module) -> nn.Module | None:
    base = getattr(llm, "base_model", llm)
    for name in ("norm", "ln_f", "final_layernorm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def decoder_directions(transcoder: nn.Module) -> torch.Tensor:
    """``[L, F, d]``: what each feature adds to the residual stream in total (a CLT's writes to
    every target summed), raw units (call on a folded / exported model)."""
    W = transcoder.W_dec
    if isinstance(W, (nn.ParameterList, list, tuple)):  # CLT: W_dec[s]  # [F, L - s, d]
        return torch.stack([w.detach().float().sum(1) for w in W])
    return W.detach().float()  # PLT / SAE: [L, F, d]


@torch.no_grad()
def decoder_target_norms(transcoder: nn.Module) -> torch.Tensor | None:
    """``[L, F, L]``: the norm of feature (s, i)'s write to each target layer t (0 where t < s),
    for a CLT (``W_dec[s]  # [F, L - s, d]``); None for one-target families."""
    W = getattr(transcoder, "W_dec", None)
    if not isinstance(W, (nn.ParameterList, list, tuple)):
        return None
    L = len(W)
    out = torch.zeros(L, W[0].shape[0], L)
    for s, w in enumerate(W):
        out[s, :, s:] = torch.linalg.vector_norm(w.detach().float(), dim=2).cpu()
    return out


@torch.no_grad()
def nearest_features(
    transcoder: nn.Module | None,
    k: int = 8,
    max_features: int = MAX_NEIGHBOUR_FEATURES,
    dirs: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows ``[L*F, k]``, cosines ``[L*F, k]``): every feature's ``k`` nearest other features by the
    cosine of their total decoder directions (``decoder_directions``, or ``dirs  # [L, F, d]``),
    over all layers. None past ``max_features`` features (all pairs: ``(L*F)² · d`` multiply-adds).
    ``rows``: only these features (flat ``layer * F + index``), in that order."""
    dirs = decoder_directions(transcoder).cpu() if dirs is None else dirs
    L, F, d = dirs.shape
    if L * F > max_features:
        return None
    chunk = max(1, 2**26 // (L * F))  # a [chunk, L*F] similarity block of at most 256 MiB
    unit = torch.nn.functional.normalize(dirs.reshape(L * F, d), dim=1)
    k = min(k, L * F - 1)
    wanted = torch.arange(L * F) if rows is None else rows
    out, cos = [], []
    for s in range(0, wanted.numel(), chunk):
        mine = wanted[s : s + chunk]
        sim = unit[mine] @ unit.T  # [n, LF]
        sim[torch.arange(sim.shape[0]), mine] = -2.0  # not itself
        c, r = sim.topk(k, dim=1)
        out.append(r)
        cos.append(c)
    return torch.cat(out), torch.cat(cos)


@torch.no_grad()
def decoder_logits(
    transcoder: nn.Module, llm: nn.Module, k: int = 10, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top ``k`` token ids ``[L, F, k]``, bottom ``k`` ``[L, F, k]``) of
    ``unembed(final_norm(direction))`` for every feature's decoder direction."""
    dirs = decoder_directions(transcoder).cpu()
    L, F, d = dirs.shape
    head = llm.get_output_embeddings()
    norm = _final_norm(llm)
    dev = head.weight.device
    flat = dirs.reshape(L * F, d)
    top, bottom = [], []
    for s in range(0, L * F, chunk):
        v = flat[s : s + chunk].to(dev, head.weight.dtype)[None]  # [1, n, d]
        if norm is not None:
            v = norm(v)
        logits = head(v)[0].float()  # [n, V]
        top.append(logits.topk(k, dim=1).indices.cpu())
        bottom.append((-logits).topk(k, dim=1).indices.cpu())
    return torch.cat(top).view(L, F, k), torch.cat(bottom).view(L, F, k)


@torch.no_grad()
def activations_on_text(transcoder: nn.Module, llm, text: str) -> tuple[list[int], torch.Tensor]:
    """(token ids with BOS first, activations ``[T-1, L, F]`` of every token after BOS) of
    ``transcoder`` on ``text`` read by ``llm`` (an ``LLMHandle``), as the training stream reads it."""
    from torchtitan_clt.data.tokenize import special_ids

    a = transcoder.args
    bos, _ = special_ids(llm.tokenizer)
    ids = [bos] + list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise ValueError("the text has no tokens: give a few words.")
    extractor = llm.extractor(a.hook_in, a.hook_out, list(a.layers or range(a.n_layers)))
    x, _ = extractor(torch.tensor([ids]))  # [T-1, L, d_in]
    ref = next(iter(transcoder.parameters()))
    was_training = transcoder.training
    transcoder.eval()
    try:
        acts = transcoder.encode(x.to(ref.device, torch.float32)).float().cpu()
    finally:
        transcoder.train(was_training)
    return ids, acts
