"""Hook points: the DESIGN names mapped onto the modules of each supported architecture.

| point        | Llama / Qwen2 / Qwen3 / Mistral / Gemma | Gemma-2 / Gemma-3             | GPT-2         |
|--------------|-----------------------------------------|-------------------------------|---------------|
| resid_mid    | input of post_attention_layernorm       | input of pre_feedforward_layernorm | input of ln_2 |
| mlp_in       | input of mlp                            | input of mlp                  | input of mlp  |
| mlp_out      | output of mlp                           | output of post_feedforward_layernorm | output of mlp |
| resid_post   | output of the decoder layer             | output of the decoder layer   | output of the block |

``hook_module(model, layer, point) -> (module, kind)`` with ``kind`` ``"input"`` (read the first
positional input with a forward pre-hook) or ``"output"`` (read, or replace, the output with a
forward hook). Evaluation splices a transcoder in place of ``mlp_out`` through the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchtitan_clt.config.manager import ConfigError

HOOK_POINTS = ("resid_mid", "mlp_in", "mlp_out", "resid_post")
# Order in which the hooks of one layer fire during the forward.
POINT_ORDER = {p: i for i, p in enumerate(HOOK_POINTS)}

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma"}
_GEMMA2_LIKE = {"gemma2", "gemma3", "gemma3_text"}
_GPT2 = {"gpt2"}
SUPPORTED = sorted(_LLAMA_LIKE | _GEMMA2_LIKE | _GPT2)

# (module name inside a layer, kind); "" is the layer itself.
_MAP: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {
        "resid_mid": ("post_attention_layernorm", "input"),
        "mlp_in": ("mlp", "input"),
        "mlp_out": ("mlp", "output"),
        "resid_post": ("", "output"),
    },
    "gemma2": {
        "resid_mid": ("pre_feedforward_layernorm", "input"),
        "mlp_in": ("mlp", "input"),
        "mlp_out": ("post_feedforward_layernorm", "output"),
        "resid_post": ("", "output"),
    },
    "gpt2": {
        "resid_mid": ("ln_2", "input"),
        "mlp_in": ("mlp", "input"),
        "mlp_out": ("mlp", "output"),
        "resid_post": ("", "output"),
    },
}


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def family(model: nn.Module) -> str:
    """Which module map applies: ``llama``, ``gemma2`` or ``gpt2``."""
    mt = model_type(model)
    if mt in _LLAMA_LIKE:
        return "llama"
    if mt in _GEMMA2_LIKE:
        return "gemma2"
    if mt in _GPT2:
        return "gpt2"
    raise ConfigError(
        f"data.model_path: architecture {mt!r} is not supported for activation hooks; supported "
        f"model types: {', '.join(SUPPORTED)}."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, wherever this architecture keeps it."""
    family(model)
    for path in (
        "model.layers",
        "model.language_model.layers",
        "language_model.model.layers",
        "transformer.h",
        "layers",
        "h",
    ):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"Cannot find the decoder layers of {type(model).__name__} ({model_type(model)}).")


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def d_model(model: nn.Module) -> int:
    return int(model.get_input_embeddings().embedding_dim)


def check_point(point: str) -> None:
    if point not in HOOK_POINTS:
        raise ConfigError(f"Hook point {point!r} is unknown: choose one of {', '.join(HOOK_POINTS)}.")


def check_layers(model: nn.Module, layers: list[int]) -> list[int]:
    """``layers`` (empty: all) validated against the model."""
    n = n_layers(model)
    layers = list(range(n)) if not layers else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ConfigError(
            f"data.layers = {layers}: layer(s) {bad} do not exist; the model has {n} layers (0..{n - 1})."
        )
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ConfigError(f"data.layers = {layers}: give distinct layers in increasing order.")
    return layers


def hook_module(model: nn.Module, layer: int, point: str) -> tuple[nn.Module, str]:
    """(module, ``"input"`` | ``"output"``) that carries ``point`` at ``layer``."""
    check_point(point)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ConfigError(f"Layer {layer} does not exist; the model has {len(layers)} layers.")
    name, kind = _MAP[family(model)][point]
    block = layers[layer]
    return (block.get_submodule(name) if name else block), kind


def output_tensor(out: Any) -> torch.Tensor:
    """The hidden states in a module output (decoder layers return a tuple in some versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out
