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

from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderOutput


def reconstruction_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_{l,d} (ŷ − y)², averaged over tokens. y_hat, y  # [B, L, d]"""
    return (y_hat.float() - y.float()).pow(2).sum(dim=(-2, -1)).mean()


def tanh_sparsity(acts: torch.Tensor, dec_norms: torch.Tensor, c: float) -> torch.Tensor:
    """Σ_{l,i} tanh(c · a_{l,i} · ‖W_dec,l,i‖), averaged over tokens. acts [B, L, F], dec_norms [L, F]"""
    return torch.tanh(c * acts.float() * dec_norms.float()).sum(dim=(-2, -1)).mean()


def l1_sparsity(acts: torch.Tensor, dec_norms: torch.Tensor) -> torch.Tensor:
    """Σ_{l,i} a_{l,i} · ‖W_dec,l,i‖, averaged over tokens (activations are non-negative)."""
    return (acts.float() * dec_norms.float()).sum(dim=(-2, -1)).mean()


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
            contrib = value if w == 1.0 else w * value
            loss = contrib if loss is None else loss + contrib
            logged[term.name] = value.detach()
            if term.name in self.weight_names:
                logged[self.weight_names[term.name]] = torch.tensor(w, device=value.device)
        assert loss is not None, "a loss needs at least one term"
        return loss, logged


def build_loss_fn(job_config: Any) -> LossFn:
    lc = job_config.loss
    terms = [
        LossTerm("recon", lambda model, out, y, step: reconstruction_loss(out.y_hat, y), lambda step: 1.0)
    ]
    weight_names = {}
    if lc.sparsity != "none":
        mode, c = lc.decoder_norm, lc.tanh_c

        def sparsity(model: Transcoder, out: TranscoderOutput, y: torch.Tensor, step: int) -> torch.Tensor:
            norms = decoder_norms_of(model, out, mode)
            if lc.sparsity == "tanh":
                return tanh_sparsity(out.acts, norms, c)
            return l1_sparsity(out.acts, norms)

        terms.append(
            LossTerm(
                "sparsity", sparsity, lambda step: lambda_at(step, lc.lambda_sparsity, lc.lambda_warmup_steps)
            )
        )
        weight_names["sparsity"] = "lambda"
    return LossFn(terms, weight_names)
