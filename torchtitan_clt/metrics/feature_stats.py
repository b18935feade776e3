"""Feature statistics of a dictionary on activation batches ``(x, y)`` in raw units.

Per layer: FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖², NMSE = Σ‖y − ŷ‖² / Σ‖y‖², explained variance = 1 − FVU,
L0 (active features per token), firing frequency of every feature, hence the dead (never fired)
and dense (fired on more than ``dense_threshold`` of the tokens) fractions and a histogram of
log10 firing frequency. For a CLT, the raw-unit norm of each feature's write to the target at
offset o = t − s from its source s (``W_dec,s  # [F, L−s, d]``): how much each source writes to
later layers. Everything is JSON-ready (floats and lists; NaN where undefined).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchtitan_clt.metrics.training import FVUSums, fvu_sums

DEFAULT_DENSE_THRESHOLD = 0.1
# log10 firing-frequency histogram: bins of 0.2 decades from 1e-8 to 1 (frequency 1 falls in the last).
HIST_LOW, HIST_HIGH, HIST_BINS = -8.0, 0.0, 40


def _floats(t: torch.Tensor) -> list:
    return (
        [float(v) for v in t.detach().double().cpu().reshape(-1)] if t.dim() <= 1 else [_floats(r) for r in t]
    )


def _mean_finite(vals: list[float]) -> float:
    good = [v for v in vals if math.isfinite(v)]
    return sum(good) / len(good) if good else float("nan")


class FeatureStatsAccumulator:
    """Add batches with ``update(x, y)``; ``compute()`` returns the statistics of their union."""

    def __init__(self, transcoder: nn.Module, dense_threshold: float = DEFAULT_DENSE_THRESHOLD):
        self.tc = transcoder
        self.dense_threshold = dense_threshold
        a = transcoder.args
        self.L, self.F = a.n_layers, a.features_per_layer
        self.sums: FVUSums | None = None
        self.fired: torch.Tensor | None = None  # [L, F] tokens on which each feature fired
        self.active = torch.zeros(self.L, dtype=torch.float64)  # Σ active features per layer
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x  # [N, L, d_in], y  # [N, L, d_out] raw units."""
        ref = next(iter(self.tc.parameters()), None)
        dev = ref.device if ref is not None else x.device
        x, y = x.to(dev, torch.float32), y.to(dev, torch.float32)
        was_training = self.tc.training
        self.tc.eval()  # BatchTopK: per-token thresholds, as at inference
        try:
            acts = self.tc.encode(x)  # [N, L, F]
            y_hat = self.tc(x).float()  # forward, not decode(acts): a MOLT's decode also reads x
        finally:
            self.tc.train(was_training)
        s = fvu_sums(y, y_hat)
        self.sums = s if self.sums is None else self.sums + s
        on = acts != 0
        fired = on.sum(0).double().cpu()  # [L, F]
        self.fired = fired if self.fired is None else self.fired + fired
        self.active += on.sum((0, 2)).double().cpu()
        self.tokens += x.shape[0]

    def compute(self) -> dict[str, Any]:
        if self.sums is None or self.fired is None:
            raise ValueError("FeatureStatsAccumulator: no batches were added.")
        fvu = self.sums.fvu().cpu()
        nmse = (self.sums.sse / self.sums.sumsq.clamp_min(1e-30)).cpu()
        freq = self.fired / max(self.tokens, 1)  # [L, F]
        dead = (freq == 0).double().mean(1)
        dense = (freq > self.dense_threshold).double().mean(1)
        edges = torch.linspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1, dtype=torch.float64)
        counts = []
        for layer in range(self.L):
            f = freq[layer][freq[layer] > 0].log10().clamp(HIST_LOW, HIST_HIGH)
            counts.append([int(c) for c in torch.histogram(f, bins=edges).hist])
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "fvu_per_layer": _floats(fvu),
            "nmse_per_layer": _floats(nmse),
            "explained_variance_per_layer": _floats(1.0 - fvu),
            "l0_per_layer": _floats(self.active / max(self.tokens, 1)),
            "dead_frac_per_layer": _floats(dead),
            "dense_frac_per_layer": _floats(dense),
            "dense_threshold": self.dense_threshold,
            "density_hist": {
                "log10_edges": _floats(edges),
                "counts_per_layer": counts,
                "dead_per_layer": [int(v) for v in (freq == 0).sum(1)],
            },
        }
        for key in ("fvu", "nmse", "explained_variance", "l0", "dead_frac", "dense_frac"):
            out[key] = _mean_finite(out[f"{key}_per_layer"])
        out["decoder_norm_by_offset"] = self._decoder_norms()
        return out

    def _decoder_norms(self) -> dict[str, Any] | None:
        return decoder_norms_by_offset(self.tc)


def feature_stats(
    transcoder: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
) -> dict[str, Any]:
    """Statistics over ``batches`` of raw ``(x [N, L, d_in], y [N, L, d_out])``."""
    acc = FeatureStatsAccumulator(transcoder, dense_threshold)
    for x, y in batches:
        acc.update(x, y)
    return acc.compute()


def _clt_decoders(transcoder: nn.Module) -> list[torch.Tensor] | None:
    """The per-source decoders ``[F, L−s, d]`` of a CLT-shaped model, else None."""
    W = getattr(transcoder, "W_dec", None)
    L = transcoder.args.n_layers
    if not isinstance(W, nn.ParameterList) or len(W) != L:
        return None
    if any(w.dim() != 3 or w.shape[1] != L - s for s, w in enumerate(W)):
        return None
    return list(W)


@torch.no_grad()
def decoder_norms_by_offset(transcoder: nn.Module) -> dict[str, Any] | None:
    """For a CLT: norms of W_dec,s→s+o per feature in raw units, summarized by offset o.

    ``mean[s][o]``: mean over source s's features (NaN where s + o ≥ L);
    ``share[s][o]``: fraction of source s's squared decoder norm written at offset o;
    ``per_offset``: over all sources and features at offset o, the mean and the 10/50/90th
    percentiles. None for families without cross-layer decoders."""
    decs = _clt_decoders(transcoder)
    if decs is None:
        return None
    scale = transcoder.out_scale.float()  # [L, d_out]: raw = standardized · scale (+ mean)
    norms = []
    for s, W in enumerate(decs):
        w = W.detach().float() * scale[s:].to(W.device)[None]  # [F, L−s, d]
        norms.append(torch.linalg.vector_norm(w, dim=2).double().cpu())  # [F, L−s]
    return summarize_decoder_norms(norms)


def summarize_decoder_norms(per_source: list[torch.Tensor]) -> dict[str, Any]:
    """``decoder_norms_by_offset``'s summary of ``per_source[s]  # [F, L−s]`` raw-unit norms."""
    L = len(per_source)
    mean = torch.full((L, L), float("nan"), dtype=torch.float64)
    share = torch.full((L, L), float("nan"), dtype=torch.float64)
    by_offset: list[list[torch.Tensor]] = [[] for _ in range(L)]
    for s, norms in enumerate(per_source):
        mean[s, : L - s] = norms.mean(0)
        sq = norms.pow(2).sum(0)
        share[s, : L - s] = sq / sq.sum().clamp_min(1e-30)
        for o in range(L - s):
            by_offset[o].append(norms[:, o])
    per_offset = {"offset": list(range(L)), "mean": [], "p10": [], "p50": [], "p90": []}
    for o in range(L):
        v = torch.cat(by_offset[o])
        q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        per_offset["mean"].append(float(v.mean()))
        for k, val in zip(("p10", "p50", "p90"), q):
            per_offset[k].append(float(val))
    return {"mean": _floats(mean), "share": _floats(share), "per_offset": per_offset}
