"""Feature examples: what each feature responds to, from one streaming pass over held-out text.

    acc = FeatureExamplesAccumulator(transcoder, n_examples=8)
    for tokens in batches:                        # [B, T] token ids, BOS at position 0
        acc.update(tokens, *extractor(tokens))    # x [B*(T-1), L, d] raw units (BOS dropped)
    ex = acc.result()

Per feature (layer j of the dictionary, index i): the ``n_examples`` contexts where its largest
activation is highest (a context enters once, ranked by its maximum), with the per-token
activations over the whole context; its density (fraction of tokens on which it fires), its
maximum, and a histogram of its non-zero activations over ``[0, hist_top]`` (the top doubles when
an activation exceeds it, merging bins pairwise, so no second pass is needed). Memory is
``O(features × n_examples × T)``, independent of the amount of text.

``decoder_logits`` gives the tokens each feature's decoder promotes (and suppresses) through the
LLM's final norm and unembedding: the direct path from its write to the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HIST_BINS = 32


@dataclass
class FeatureExamples:
    """Everything ``FeatureExamplesAccumulator.result`` found; ``LF = n_layers × F`` rows, feature
    ``(j, i)`` at row ``j * F + i``. Unused example slots have value 0 and context -1."""

    n_layers: int
    n_features: int
    tokens_seen: int
    fired: torch.Tensor  # [LF] tokens on which the feature fired
    act_max: torch.Tensor  # [LF]
    top_values: torch.Tensor  # [LF, K] max activation of each example context, descending
    top_context: torch.Tensor  # [LF, K] context number (order of arrival), -1 unused
    top_tokens: torch.Tensor  # [LF, K, T] token ids of the context (BOS included)
    top_acts: torch.Tensor  # [LF, K, T-1] per-token activations (positions 1..T-1)
    hist: torch.Tensor  # [LF, HIST_BINS] counts of non-zero activations over [0, hist_top]
    hist_top: torch.Tensor  # [LF]

    @property
    def density(self) -> torch.Tensor:
        return self.fired.double() / max(self.tokens_seen, 1)


class FeatureExamplesAccumulator:
    def __init__(self, transcoder: nn.Module, n_examples: int = 8):
        self.tc = transcoder
        a = transcoder.args
        self.L, self.F, self.K = a.n_layers, a.features_per_layer, n_examples
        self.LF = self.L * self.F
        self.tokens_seen = 0
        self.contexts = 0
        self.fired = torch.zeros(self.LF, dtype=torch.int64)
        self.act_max = torch.zeros(self.LF)
        self.top_values = torch.zeros(self.LF, self.K)
        self.top_context = torch.full((self.LF, self.K), -1, dtype=torch.int64)
        self.top_tokens: torch.Tensor | None = None  # allocated on the first batch (T known)
        self.top_acts: torch.Tensor | None = None
        self.hist = torch.zeros(self.LF, HIST_BINS, dtype=torch.int64)
        self.hist_top = torch.zeros(self.LF)

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """tokens  # [B, T]; x  # [B*(T-1), L, d_in] raw, the rows of positions 1..T-1."""
        B, T = tokens.shape
        if self.top_tokens is None:
            self.top_tokens = torch.zeros(self.LF, self.K, T, dtype=torch.int64)
            self.top_acts = torch.zeros(self.LF, self.K, T - 1)
        was_training = self.tc.training
        self.tc.eval()  # BatchTopK and friends: their per-token inference form
        try:
            ref = next(iter(self.tc.parameters()))
            acts = self.tc.encode(x.to(ref.device, torch.float32)).float().cpu()  # [B*(T-1), L, F]
        finally:
            self.tc.train(was_training)
        acts = acts.reshape(B, T - 1, self.LF)
        self.fired += (acts > 0).sum((0, 1))
        self.tokens_seen += B * (T - 1)
        ctx_max = acts.amax(1)  # [B, LF]
        self.act_max = torch.maximum(self.act_max, ctx_max.amax(0))
        self._update_hist(acts)
        self._update_top(tokens.cpu(), acts, ctx_max)
        self.contexts += B

    def _update_top(self, tokens: torch.Tensor, acts: torch.Tensor, ctx_max: torch.Tensor) -> None:
        K = self.K
        cand = torch.cat([self.top_values, ctx_max.T], dim=1)  # [LF, K + B]
        vals, pick = torch.topk(cand, K, dim=1)  # ties between 0s do not matter: 0 means unused
        keep = pick.clamp(max=K - 1)  # slots taken from the old examples (others overwritten)
        new_ctx = torch.where(pick < K, self.top_context.gather(1, keep), self.contexts + pick - K)
        self.top_tokens = self.top_tokens.gather(1, keep[:, :, None].expand(-1, -1, self.top_tokens.shape[2]))
        self.top_acts = self.top_acts.gather(1, keep[:, :, None].expand(-1, -1, self.top_acts.shape[2]))
        f_idx, slot = (pick >= K).nonzero(as_tuple=True)
        b_idx = pick[f_idx, slot] - K
        self.top_tokens[f_idx, slot] = tokens[b_idx]
        self.top_acts[f_idx, slot] = acts[b_idx, :, f_idx]
        unused = vals <= 0
        self.top_values = vals.masked_fill(unused, 0.0)
        self.top_context = new_ctx.masked_fill(unused, -1)

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
        T = self.top_tokens.shape[2] if self.top_tokens is not None else 1
        return FeatureExamples(
            n_layers=self.L,
            n_features=self.F,
            tokens_seen=self.tokens_seen,
            fired=self.fired.clone(),
            act_max=self.act_max.clone(),
            top_values=self.top_values.clone(),
            top_context=self.top_context.clone(),
            top_tokens=(
                self.top_tokens if self.top_tokens is not None else torch.zeros(self.LF, self.K, T)
            ).clone(),
            top_acts=(
                self.top_acts if self.top_acts is not None else torch.zeros(self.LF, self.K, T - 1)
            ).clone(),
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
