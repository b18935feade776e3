"""Read the input and target activations of the chosen layers from one LLM forward.

Forward hooks copy the hook points out; the hook that fires last (the later of the two points at
the last layer) raises a private exception, so the later layers, the final norm and the unembedding
never run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchtitan_clt.data.hooks import POINT_ORDER, check_layers, check_point, hook_module, output_tensor


class _StopForward(Exception):
    """Raised from the last needed hook; caught by ``ActivationExtractor``."""


class ActivationExtractor:
    """``tokens [B, T] -> (x [B*(T-1), L, d], y [B*(T-1), L, d])``, BOS position dropped.

    The outputs are fp32 unless ``dtype`` says otherwise (the shuffle buffer keeps the LLM's own
    dtype: a bf16 model's activations lose nothing in bf16 and take half the memory).
    """

    def __init__(
        self,
        llm: nn.Module,
        hook_in: str,
        hook_out: str,
        layers: list[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        check_point(hook_in)
        check_point(hook_out)
        self.llm, self.hook_in, self.hook_out = llm, hook_in, hook_out
        self.layers = check_layers(llm, list(layers or []))
        last = self.layers[-1]
        self._stop_at = (last, max((hook_in, hook_out), key=POINT_ORDER.__getitem__))
        self._store: dict[tuple[int, str], torch.Tensor] = {}
        self.device = next(llm.parameters()).device
        self.dtype = dtype

    def _make_hook(self, key: tuple[int, str], kind: str):
        stop = key == self._stop_at

        def capture(t: torch.Tensor) -> None:
            self._store[key] = t.detach()
            if stop:
                raise _StopForward

        if kind == "input":

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                capture(args[0] if args else next(iter(kwargs.values())))

            return pre_hook

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            capture(output_tensor(out))

        return hook

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(self.device)
        handles = []
        try:
            for layer in self.layers:
                for point in {self.hook_in, self.hook_out}:
                    module, kind = hook_module(self.llm, layer, point)
                    hook = self._make_hook((layer, point), kind)
                    if kind == "input":
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    else:
                        handles.append(module.register_forward_hook(hook))
            try:
                self.llm(input_ids=tokens, use_cache=False)
            except _StopForward:
                pass
            x = self._stack(self.hook_in)
            y = self._stack(self.hook_out)
        finally:
            for h in handles:
                h.remove()
            self._store.clear()
        return x, y

    def _stack(self, point: str) -> torch.Tensor:
        acts = torch.stack([self._store[(layer, point)] for layer in self.layers], dim=2)  # [B, T, L, d]
        acts = acts[:, 1:]  # position 0 (BOS) is never trained on
        return acts.reshape(-1, acts.shape[2], acts.shape[3]).to(self.dtype)
