"""Loss terms and ``build_loss_fn``.

The loss is a weighted sum of named terms (``LossTerm``); ``build_loss_fn`` picks them from the
config. A new term (pre-activation loss, AuxK) is one function plus one entry in that list.
All terms are taken in fp32 and averaged over tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchtitan_clt.kernels.dispatch import norm_weighted
from torchtitan_clt.protocols.transcoder import SparseCode, Transcoder, TranscoderOutput, feature_shard


def reconstruction_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_{l,d} (ŷ − y)², averaged over tokens. y_hat, y  # [B, L, d]"""
    return (y_hat.float() - y.float()).pow(2).sum(dim=(-2, -1)).mean()


def tanh_sparsity(acts: torch.Tensor, dec_norms: torch.Tensor, c: float) -> torch.Tensor:
    """Σ_{l,i} tanh(c · a_{l,i} · ‖W_dec,l,i‖), averaged over tokens. acts [B, L, F], dec_norms [L, F]"""
    return torch.tanh(c * acts.float() * dec_norms.float()).sum(dim=(-2, -1)).mean()


def l1_sparsity(acts: torch.Tensor, dec_norms: torch.Tensor) -> torch.Tensor:
    """Σ_{l,i} a_{l,i} · ‖W_dec,l,i‖, averaged over tokens (activations are non-negative)."""
    return (acts.float() * dec_norms.float()).sum(dim=(-2, -1)).mean()


def code_sparsity(code: SparseCode, dec_norms: torch.Tensor, c: float | None) -> torch.Tensor:
    """``tanh_sparsity`` (``c``) or ``l1_sparsity`` (``c`` None) read from the sparse code: the
    same sum over the active entries only (an inactive entry adds 0 to either)."""
    a = norm_weighted(code.idx, code.vals, dec_norms.float())  # [N, L, K], 0 at padding
    return (torch.tanh(c * a) if c is not None else a).sum() / max(code.idx.shape[0], 1)


def matryoshka_reconstruction_loss(y_hats: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """The mean over nested prefixes of each prefix's reconstruction loss (Bussmann et al. 2025).
    With one prefix it is ``reconstruction_loss``."""
    return torch.stack([reconstruction_loss(y_hat, y) for y_hat in y_hats]).mean()


def preact_loss(pre_acts: torch.Tensor, thresholds: torch.Tensor, dec_norms: torch.Tensor) -> torch.Tensor:
    """Σ_{l,i} ReLU(θ_{l,i} − h_{l,i}) · ‖W_dec,l,i‖, averaged over tokens (Anthropic, "Circuits
    Updates – January 2025"): pulls every pre-activation below its threshold up, so features that
    never fire get a gradient. pre_acts [B, L, F]; thresholds [L, F] (0 for ReLU, detached);
    dec_norms [L, F]."""
    gap = torch.relu(thresholds.to(pre_acts.device).float() - pre_acts.float())
    return (gap * dec_norms.float()).sum(dim=(-2, -1)).mean()


def auxk_loss(
    model: Transcoder, out: TranscoderOutput, y: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", A.2): per token and
    layer the k_aux largest pre-activations of dead features reconstruct the detached residual
    e = y − ŷ; returns ‖e − ê‖² / ‖e − ē‖² (sums over tokens, layers and dimensions; ē the batch
    mean of e). ê is the decoder without its bias. dead [L, F] bool; 0 when nothing is dead."""
    h = out.pre_acts
    dead = dead.to(h.device)
    n_dead = int(dead.sum(-1).max()) if dead.numel() else 0
    if n_dead == 0 or k_aux <= 0:
        return h.float().sum() * 0.0  # keeps the graph (and FSDP's hooks) the same shape
    e = (y.float() - out.y_hat.detach().float()).detach()  # [B, L, d]
    masked = h.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(min(k_aux, n_dead), dim=-1)  # [B, L, k]
    a_aux = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
    xs = out.xs
    e_hat = model.decode_std_with(a_aux, xs).float()
    zero = torch.zeros_like(h[:1])
    e_hat = e_hat - model.decode_std_with(zero, None if xs is None else xs[:1]).float()
    denom = (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return (e - e_hat).pow(2).sum() / denom


def lambda_at(step: int, final: float, warmup_steps: int) -> float:
    """λ(step): linear from 0 at step 0 to ``final`` at ``warmup_steps``, constant after."""
    if warmup_steps <= 0:
        return final
    return final * min(1.0, max(step, 0) / warmup_steps)


def decoder_norms_of(model: Transcoder, out: TranscoderOutput, mode: str) -> torch.Tensor:
    """The norms forward already took (inside FSDP's unsharded window) when they match ``mode``."""
    if out.dec_norms is not None and model.args.decoder_norm == mode:
        return out.dec_norms
    return model.decoder_norms(mode)


TermFn = Callable[[Transcoder, TranscoderOutput, torch.Tensor, int], torch.Tensor]


@dataclass
class LossTerm:
    name: str
    """Key of the term in the ``terms`` dict."""
    fn: TermFn
    """fn(model, out, y_std, step) -> unweighted scalar."""
    weight: Callable[[int], float]
    """Coefficient at a step."""
    scale: Callable[[Transcoder], float] | None = None
    """A model-dependent factor on the coefficient (AuxK: α is relative to the FVU, the
    reconstruction term a sum over the model's L·d_out standardized target dimensions)."""


class LossFn:
    """loss_fn(model, out, y_std, step) -> (loss, terms); terms are detached scalars."""

    def __init__(self, terms: list[LossTerm], weight_names: dict[str, str] | None = None):
        self.terms = terms
        # Coefficients logged under their own names, e.g. {"sparsity": "lambda"}.
        self.weight_names = weight_names or {}

    def __call__(
        self, model: Transcoder, out: TranscoderOutput, y_std: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = None
        logged: dict[str, torch.Tensor] = {}
        for term in self.terms:
            value = term.fn(model, out, y_std, step)
            w = term.weight(step)
            if term.scale is not None:
                w = w * term.scale(model)
            contrib = value if w == 1.0 else w * value
            loss = contrib if loss is None else loss + contrib
            logged[term.name] = value.detach()
            if term.name in self.weight_names:
                logged[self.weight_names[term.name]] = torch.tensor(w, device=value.device)
        assert loss is not None, "a loss needs at least one term"
        return loss, logged


def _thresholds(model: Transcoder, like: torch.Tensor) -> torch.Tensor:
    """θ [L, F] of the model's activation (0 for ReLU), detached, on ``like``'s device."""
    act = model.activation
    theta = act.feature_thresholds() if hasattr(act, "feature_thresholds") else torch.zeros(like.shape[-2:])
    n = like.shape[-1]
    if theta.shape[-1] != n:  # a replicated activation's whole [L, F] under tp: this rank's features
        theta = feature_shard(theta, n, model.mesh_groups.features)
    return theta.detach().to(device=like.device, dtype=torch.float32)


def dead_after_tokens_of(job_config: Any) -> int:
    """``loss.dead_after_tokens``, with ``0`` (auto) resolved: silent for 1/20 of the run's
    tokens (``training.steps × training.batch_size``), at most 10 M tokens."""
    n = job_config.loss.dead_after_tokens
    if n > 0:
        return int(n)
    t = job_config.training
    return int(max(1, min(DEAD_AFTER_TOKENS_MAX, t.steps * t.batch_size // DEAD_RUN_FRACTION)))


DEAD_AFTER_TOKENS_MAX = 10_000_000
DEAD_RUN_FRACTION = 20


def recon_dims(model: Transcoder) -> float:
    """L·d_out: the reconstruction term at FVU 1 with standardized targets."""
    return float(model.args.n_layers * model.args.d_out)


def build_loss_fn(lc: Any, dead_features: Any = None) -> LossFn:
    """Terms from the ``[loss]`` section ``lc``: ``recon`` (Matryoshka: averaged over prefixes), ``sparsity``
    (tanh / L1, λ warm-up), ``preact`` (λ_P, warm-up), ``auxk`` (α). AuxK reads the dead features
    from ``dead_features.dead_mask()  # [L, F]`` (the trainer's DeadFeatureTracker)."""

    def recon(model: Transcoder, out: TranscoderOutput, y: torch.Tensor, step: int) -> torch.Tensor:
        if out.y_hat_prefixes is not None:
            return matryoshka_reconstruction_loss(out.y_hat_prefixes, y)
        return reconstruction_loss(out.y_hat, y)

    terms = [LossTerm("recon", recon, lambda step: 1.0)]
    weight_names = {}
    mode = lc.decoder_norm
    if lc.sparsity != "none":
        c = lc.tanh_c

        def sparsity(model: Transcoder, out: TranscoderOutput, y: torch.Tensor, step: int) -> torch.Tensor:
            norms = decoder_norms_of(model, out, mode)
            if out.code is not None:
                return code_sparsity(out.code, norms, c if lc.sparsity == "tanh" else None)
            if lc.sparsity == "tanh":
                return tanh_sparsity(out.acts, norms, c)
            return l1_sparsity(out.acts, norms)

        terms.append(
            LossTerm(
                "sparsity", sparsity, lambda step: lambda_at(step, lc.lambda_sparsity, lc.lambda_warmup_steps)
            )
        )
        weight_names["sparsity"] = "lambda"
    if lc.lambda_preact > 0:

        def preact(model: Transcoder, out: TranscoderOutput, y: torch.Tensor, step: int) -> torch.Tensor:
            return preact_loss(
                out.pre_acts, _thresholds(model, out.pre_acts), decoder_norms_of(model, out, mode)
            )

        terms.append(
            LossTerm(
                "preact",
                preact,
                lambda step: lambda_at(step, lc.lambda_preact, lc.lambda_preact_warmup_steps),
            )
        )
        weight_names["preact"] = "lambda_preact"
    if lc.auxk_alpha > 0:
        if dead_features is None:
            raise ValueError(
                "loss.auxk_alpha > 0 needs the dead-feature tracker: build_loss_fn(cfg.loss, dead_features=tracker)."
            )
        k_aux = lc.auxk_k

        def auxk(model: Transcoder, out: TranscoderOutput, y: torch.Tensor, step: int) -> torch.Tensor:
            return auxk_loss(model, out, y, dead_features.dead_mask(), k_aux)

        terms.append(LossTerm("auxk", auxk, lambda step: lc.auxk_alpha, scale=recon_dims))
    return LossFn(terms, weight_names)
