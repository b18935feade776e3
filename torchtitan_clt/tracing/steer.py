"""Steer or ablate one feature and see what the LLM does: next-token distribution and a short
generation, before and after, through the replacement model that was traced.

The intervention runs inside the real LLM: at the feature's layer l its activation a is read from
the live residual stream (the transcoder's encoder at ``hook_in``), changed to a' (``scale``:
a' = s·a, ``ablate``: 0, ``value``: v at every position but BOS), and each MLP output the feature
writes (``hook_out`` at layers t ≥ l for a CLT, t = l for a per-layer transcoder) gets
(a' − a) · its decoder row to t. Everything else, error terms included, is the LLM's own
computation, so later features and layers respond to the change, as in circuit-tracer's
``feature_intervention`` with free (unconstrained) layers. The transcoder is the run's
circuit-tracer export (JumpReLU, raw units), the features the graphs show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchtitan_clt.data.hooks import hook_module, output_tensor

FEATURE = re.compile(r"^L(\d+)/F(\d+)$")


@dataclass
class Intervention:
    """One feature change: at LLM layer ``layer``, feature ``feature`` (its index in the layer)."""

    layer: int
    feature: int
    scale: float | None = None
    """a' = scale · a (0 ablates)."""
    value: float | None = None
    """a' = value at every position but BOS (turns a silent feature on)."""

    def __post_init__(self) -> None:
        if (self.scale is None) == (self.value is None):
            raise ValueError("an Intervention takes exactly one of scale (0: ablate) or value.")

    def new(self, a: torch.Tensor) -> torch.Tensor:
        out = a * self.scale if self.scale is not None else torch.full_like(a, float(self.value))
        out[:, 0] = a[:, 0]  # BOS is never trained on: leave it
        return out


def parse_feature(ref: str) -> tuple[int, int]:
    """``L7/F106`` -> (7, 106)."""
    m = FEATURE.match(ref.strip())
    if not m:
        raise ValueError(f"--feature {ref!r}: write it as L<layer>/F<index>, e.g. L7/F106.")
    return int(m.group(1)), int(m.group(2))


class FeatureSteerer:
    """Run ``llm`` with feature interventions of ``transcoder`` (a torchtitan_clt ``Transcoder``
    in raw units, e.g. ``load_circuit_tracer(run / "circuit_tracer")``)."""

    def __init__(self, llm: nn.Module, transcoder: nn.Module):
        self.llm, self.tc = llm, transcoder.eval()
        a = transcoder.args
        self.layers = list(a.layers)  # row j of the transcoder is LLM layer layers[j]
        self.hook_in, self.hook_out = a.hook_in, a.hook_out

    def row_of(self, layer: int) -> int:
        """The transcoder row of LLM layer ``layer`` (ValueError when it has no features)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no features (the transcoder covers {self.layers}).")
        return self.layers.index(layer)

    @torch.no_grad()
    def activation(self, j: int, feature: int, x: torch.Tensor) -> torch.Tensor:
        """a  # [B, T] of feature ``feature`` of row j at inputs ``x  # [B, T, d]`` (raw)."""
        X = x.new_zeros(x.shape[0] * x.shape[1], self.tc.args.n_layers, x.shape[-1])
        X[:, j] = x.reshape(-1, x.shape[-1])
        p = next(self.tc.parameters())
        return self.tc.encode(X.to(p.dtype))[:, j, feature].reshape(x.shape[:2]).to(x.dtype)

    @torch.no_grad()
    def writes(self, j: int, feature: int) -> torch.Tensor:
        """[L, d] what one unit of the feature adds to each target row (the decoder is affine)."""
        p = next(self.tc.parameters())
        one = torch.zeros(
            1, self.tc.args.n_layers, self.tc.args.features_per_layer, dtype=p.dtype, device=p.device
        )
        zero = self.tc.decode(one, features_only=True)
        one[0, j, feature] = 1.0
        return (self.tc.decode(one, features_only=True) - zero)[0]

    @contextmanager
    def applied(self, interventions: list[Intervention]) -> Iterator[None]:
        """Hooks that carry out ``interventions`` on every forward of ``self.llm`` inside."""
        handles = []
        deltas: dict[int, torch.Tensor] = {}  # intervention index -> a' − a  [B, T]
        try:
            for k, iv in enumerate(interventions):
                j = self.row_of(iv.layer)
                w = self.writes(j, iv.feature)  # [L, d]
                module, kind = hook_module(self.llm, iv.layer, self.hook_in)

                def read(x: torch.Tensor, k: int = k, j: int = j, iv: Intervention = iv) -> None:
                    a = self.activation(j, iv.feature, x.float())
                    deltas[k] = iv.new(a) - a

                handles.append(_register(module, kind, read))
                for t in range(j, self.tc.args.n_layers):
                    if not bool(w[t].any()):
                        continue  # the feature does not write this layer (a PLT: only its own)
                    out_module, out_kind = hook_module(self.llm, self.layers[t], self.hook_out)

                    def write(y: torch.Tensor, k: int = k, row: torch.Tensor = w[t]) -> torch.Tensor:
                        return y + (deltas[k][..., None] * row.to(y.device, torch.float32)).to(y.dtype)

                    handles.append(_register(out_module, out_kind, write))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def feature_activations(self, tokens: torch.Tensor, layer: int, feature: int) -> torch.Tensor:
        """[T] the feature's activation at each position of ``tokens  # [1, T]``, unsteered."""
        j, seen = self.row_of(layer), {}
        module, kind = hook_module(self.llm, layer, self.hook_in)
        handle = _register(
            module, kind, lambda x: seen.setdefault("a", self.activation(j, feature, x.float()))
        )
        try:
            self.llm(input_ids=tokens, use_cache=False)
        finally:
            handle.remove()
        return seen["a"][0]

    @torch.no_grad()
    def next_token_probs(self, tokens: torch.Tensor, interventions: list[Intervention] = ()) -> torch.Tensor:
        """[vocab] the next-token distribution after ``tokens  # [1, T]``."""
        with self.applied(list(interventions)):
            logits = self.llm(input_ids=tokens, use_cache=False).logits[0, -1]
        return torch.softmax(logits.double(), -1)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, n: int, interventions: list[Intervention] = ()) -> torch.Tensor:
        """Greedy continuation of ``tokens  # [1, T]`` by ``n`` tokens (the intervention applies at
        every position, new ones included)."""
        out = tokens
        with self.applied(list(interventions)):
            for _ in range(n):
                nxt = self.llm(input_ids=out, use_cache=False).logits[0, -1].argmax()
                out = torch.cat([out, nxt.view(1, 1).to(out.device)], dim=1)
        return out[:, tokens.shape[1] :]


def _register(module: nn.Module, kind: str, fn: Any) -> Any:
    if kind == "input":

        def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
            fn(args[0] if args else next(iter(kwargs.values())))

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m: nn.Module, args: tuple, out: Any) -> Any:
        new = fn(output_tensor(out))
        if isinstance(out, tuple):
            return (new, *out[1:])
        return new

    return module.register_forward_hook(post)


def distribution_change(before: torch.Tensor, after: torch.Tensor, tokenizer: Any, n: int = 10) -> dict:
    """The top tokens before and after, the tokens whose probability moved most, and KL."""

    def top(p: torch.Tensor) -> list[tuple[str, float]]:
        v, i = p.topk(n)
        return [(tokenizer.decode([int(t)]), float(q)) for q, t in zip(v, i)]

    diff = after - before
    moved = diff.abs().topk(n).indices
    kl = float((before * (before.clamp_min(1e-30).log() - after.clamp_min(1e-30).log())).sum())
    return {
        "before": top(before),
        "after": top(after),
        "moved": [(tokenizer.decode([int(t)]), float(before[t]), float(after[t])) for t in moved],
        "kl_before_after": kl,
    }
