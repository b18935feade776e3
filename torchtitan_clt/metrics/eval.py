"""Replacement-model evaluation: splice the dictionary into the LLM and compare next-token predictions.

Variants, all on the same held-out token batches ``[B, T]`` (position 0 is BOS):

- ``clean``: the LLM as is.
- ``closed loop``: at every covered layer the target hook (``hook_out``, e.g. ``mlp_out``) is
  replaced by the dictionary's output, computed from the input hook (``hook_in``) captured in the
  same, already patched forward. For a CLT the output at layer t needs the inputs of layers s ≤ t,
  so the forward is walked layer by layer: at layer s's input hook, source s is encoded and its
  write to every later target is added to a running sum; at layer t's target hook the sum over
  s ≤ t (plus the bias) replaces the activation.
- ``open loop`` (per layer t): only layer t is replaced; its inputs are the clean ones (nothing
  before t is patched).
- ``zero`` / ``mean`` ablation: the target hook set to 0 / to its mean over the eval tokens (all
  covered layers, and per layer for the open-loop baselines).

An SAE (``hook_in == hook_out``) is spliced at its own hook: the hook's output is replaced by its
reconstruction. The BOS position is never spliced (it keeps its clean activations: the dictionary
never saw it, and every later token attends to it) and predictions made at it are not scored.
Metrics (DESIGN.md): CE, ΔCE = CE − CE_clean, CE recovered = (CE_abl − CE) / (CE_abl − CE_clean)
for zero and mean ablation, KL(clean ‖ variant) and top-1 agreement with the clean model.

The splicing itself (hooks, the layer-by-layer dictionary state) is in ``splice.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchtitan_clt.metrics.splice import (
    DEFAULT_CHUNK_ELEMENTS,
    SpliceSpec,
    forward_ablated,
    forward_replaced,
    hook_out_means,
    is_cross_layer,
    logits_of,
)

__all__ = [
    "Baselines",
    "NextTokenSums",
    "SpliceSpec",
    "ce_recovered",
    "compute_baselines",
    "evaluate_replacement",
    "forward_ablated",
    "forward_replaced",
    "flat_metrics",
    "hook_out_means",
    "is_cross_layer",
]


# --- next-token metrics -----------------------------------------------------------------------
def scored(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored predictions: logits at positions 1..T-2 for the tokens at 2..T-1.

    The prediction made at BOS (position 0) is left out. ``logits  # [B, T, V]`` ->
    (``[B*(T-2), V]``, ``[B*(T-2)]``)."""
    if tokens.shape[1] < 3:
        raise ValueError(f"evaluation windows need at least 3 tokens (BOS + 2), got {tokens.shape[1]}.")
    lg = logits[:, 1:-1]
    return lg.reshape(-1, lg.shape[-1]), tokens[:, 2:].reshape(-1).to(logits.device)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-prediction CE in nats: ``[N, V], [N] -> [N]`` (float32)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def kl_divergence(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-prediction KL(clean ‖ other) = Σ_v p_clean (log p_clean − log p_other): ``[N, V] x2 -> [N]``."""
    lp_c = clean_logits.float().log_softmax(-1)
    lp = logits.float().log_softmax(-1)
    p_c = lp_c.exp()
    # 0 · log 0 = 0: tokens the clean model rules out (masked logits) contribute nothing.
    return torch.where(p_c > 0, p_c * (lp_c - lp), torch.zeros_like(p_c)).sum(-1)


def top1_agreement(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-prediction 1.0 where both argmaxes agree: ``[N, V] x2 -> [N]``."""
    return (clean_logits.argmax(-1) == logits.argmax(-1)).float()


@dataclass
class NextTokenSums:
    """Sums over scored predictions (float64), so batches and chunks add up exactly."""

    ce: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    count: int = 0

    @torch.no_grad()
    def update(self, clean_logits: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        for b in range(tokens.shape[0]):  # one row at a time: bounds the [T, V] fp32 temporaries
            lc, tgt = scored(clean_logits[b : b + 1], tokens[b : b + 1])
            lg, _ = scored(logits[b : b + 1], tokens[b : b + 1])
            self.ce += float(cross_entropy(lg, tgt).double().sum())
            self.kl += float(kl_divergence(lc, lg).double().sum())
            self.top1 += float(top1_agreement(lc, lg).double().sum())
            self.count += tgt.numel()

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"ce": self.ce / n, "kl": self.kl / n, "top1_agreement": self.top1 / n}


def ce_recovered(ce: float, ce_ablation: float, ce_clean: float) -> float:
    """(CE_ablation − CE) / (CE_ablation − CE_clean); NaN when the ablation changes nothing."""
    gap = ce_ablation - ce_clean
    return (ce_ablation - ce) / gap if abs(gap) > 1e-12 else float("nan")


# --- evaluation -------------------------------------------------------------------------------
@dataclass
class Baselines:
    """What does not depend on the dictionary: computed once per (LLM, token batches, layers)."""

    spec: SpliceSpec
    means: dict[int, torch.Tensor]
    clean_ce: float
    zero: dict[str, float]
    mean: dict[str, float]
    zero_per_layer: list[dict[str, float]] = field(default_factory=list)
    mean_per_layer: list[dict[str, float]] = field(default_factory=list)


def _device_of(llm: nn.Module) -> torch.device:
    return next(llm.parameters()).device


@torch.no_grad()
def compute_baselines(
    llm: nn.Module,
    token_batches: Iterable[torch.Tensor],
    spec: SpliceSpec,
    per_layer: bool = True,
    reuse: Baselines | None = None,
) -> Baselines:
    """Clean CE, zero- and mean-ablation of every covered layer (and of each alone if ``per_layer``).

    ``reuse``: baselines of the same batches and spec without the per-layer part; only that part
    is computed (the trainer's periodic evals may skip the open loop that the final one runs)."""
    dev = _device_of(llm)
    batches = [t.to(dev) for t in token_batches]
    if reuse is not None and reuse.spec != spec:
        raise ValueError(f"compute_baselines: reuse was computed for {reuse.spec}, not {spec}.")
    means = reuse.means if reuse is not None else hook_out_means(llm, batches, spec)
    clean, zero, mean = NextTokenSums(), NextTokenSums(), NextTokenSums()
    n = len(spec.layers)
    zero_l = [NextTokenSums() for _ in range(n if per_layer else 0)]
    mean_l = [NextTokenSums() for _ in range(n if per_layer else 0)]
    for tokens in batches:
        lc = logits_of(llm, tokens)
        if reuse is None:
            clean.update(lc, lc, tokens)
            zero.update(lc, forward_ablated(llm, tokens, spec, dict.fromkeys(spec.layers)), tokens)
            mean.update(lc, forward_ablated(llm, tokens, spec, means), tokens)
        for i in range(len(zero_l)):
            layer = spec.layers[i]
            zero_l[i].update(lc, forward_ablated(llm, tokens, spec, {layer: None}), tokens)
            mean_l[i].update(lc, forward_ablated(llm, tokens, spec, {layer: means[layer]}), tokens)
    clean_ce, zero_m, mean_m = (
        (reuse.clean_ce, reuse.zero, reuse.mean)
        if reuse is not None
        else (clean.means()["ce"], zero.means(), mean.means())
    )
    return Baselines(
        spec, means, clean_ce, zero_m, mean_m, [s.means() for s in zero_l], [s.means() for s in mean_l]
    )


def _summary(m: dict[str, float], clean_ce: float, zero_ce: float, mean_ce: float) -> dict[str, float]:
    return {
        "ce": m["ce"],
        "delta_ce": m["ce"] - clean_ce,
        "ce_recovered_zero": ce_recovered(m["ce"], zero_ce, clean_ce),
        "ce_recovered_mean": ce_recovered(m["ce"], mean_ce, clean_ce),
        "kl": m["kl"],
        "top1_agreement": m["top1_agreement"],
    }


@torch.no_grad()
def evaluate_replacement(
    llm: nn.Module,
    transcoder: nn.Module,
    token_batches: Iterable[torch.Tensor],
    *,
    open_loop: bool = True,
    baselines: Baselines | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ops: Any = None,
) -> dict[str, Any]:
    """Closed-loop (and per-layer open-loop) replacement metrics on ``token_batches  # [B, T]``.

    ``llm``: a plain causal LM (``hook_module`` must know it). ``transcoder``: a plain
    ``Transcoder`` (on any device; evaluated in eval mode, its mode restored after).
    ``baselines``: from ``compute_baselines`` for the same batches, to skip recomputing them.
    ``ops``: a sharded model's layer pieces (``metrics.sharded_eval.tp_shards``; every rank of the
    mesh calls this with the same batches), None for a plain model.

    Returns a JSON-ready dict: ``tokens_scored``, ``layers`` (LLM layers), ``hook_in``,
    ``hook_out``, ``ce_clean``; ``closed_loop``, ``zero_ablation``, ``mean_ablation``, each
    ``{ce, delta_ce, ce_recovered_zero, ce_recovered_mean, kl, top1_agreement}``; with
    ``open_loop``, the same keys as per-layer lists plus ``ce_zero_ablation`` /
    ``ce_mean_ablation`` (that layer alone ablated)."""
    spec = SpliceSpec.of(transcoder, llm)
    dev = _device_of(llm)
    batches = [t.to(dev) for t in token_batches]
    if not batches:
        raise ValueError("evaluate_replacement: no token batches (the held-out text is empty?).")
    if baselines is None:
        baselines = compute_baselines(llm, batches, spec, per_layer=open_loop)
    if baselines.spec != spec:
        raise ValueError(f"baselines were computed for {baselines.spec}, not {spec}.")
    if open_loop and not baselines.zero_per_layer:
        raise ValueError("open_loop needs baselines computed with per_layer=True.")
    n = len(spec.layers)
    was_training = transcoder.training
    transcoder.eval()
    try:
        closed = NextTokenSums()
        opened = [NextTokenSums() for _ in range(n if open_loop else 0)]
        for tokens in batches:
            lc = logits_of(llm, tokens)
            closed.update(
                lc,
                forward_replaced(llm, tokens, transcoder, spec, list(range(n)), chunk_elements, ops),
                tokens,
            )
            for i in range(len(opened)):
                opened[i].update(
                    lc, forward_replaced(llm, tokens, transcoder, spec, [i], chunk_elements, ops), tokens
                )
    finally:
        transcoder.train(was_training)

    b = baselines
    zce, mce = b.zero["ce"], b.mean["ce"]
    result: dict[str, Any] = {
        "tokens_scored": closed.count,
        "layers": list(spec.layers),
        "hook_in": spec.hook_in,
        "hook_out": spec.hook_out,
        "ce_clean": b.clean_ce,
        "closed_loop": _summary(closed.means(), b.clean_ce, zce, mce),
        "zero_ablation": _summary(b.zero, b.clean_ce, zce, mce),
        "mean_ablation": _summary(b.mean, b.clean_ce, zce, mce),
    }
    if open_loop:
        per = [
            _summary(opened[i].means(), b.clean_ce, b.zero_per_layer[i]["ce"], b.mean_per_layer[i]["ce"])
            for i in range(n)
        ]
        result["open_loop"] = {k: [p[k] for p in per] for k in per[0]}
        result["open_loop"]["ce_zero_ablation"] = [z["ce"] for z in b.zero_per_layer]
        result["open_loop"]["ce_mean_ablation"] = [m["ce"] for m in b.mean_per_layer]
    return result


def flat_metrics(result: dict[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    """Flat scalars (and per-layer lists) for ``MetricsLogger.log``."""
    c = result["closed_loop"]
    out: dict[str, Any] = {
        f"{prefix}ce_clean": result["ce_clean"],
        f"{prefix}ce_replacement": c["ce"],
        f"{prefix}delta_ce": c["delta_ce"],
        f"{prefix}ce_recovered_zero": c["ce_recovered_zero"],
        f"{prefix}ce_recovered_mean": c["ce_recovered_mean"],
        f"{prefix}kl": c["kl"],
        f"{prefix}top1_agreement": c["top1_agreement"],
    }
    if "open_loop" in result:
        out[f"{prefix}open_ce_recovered_zero_per_layer"] = list(result["open_loop"]["ce_recovered_zero"])
    return out
