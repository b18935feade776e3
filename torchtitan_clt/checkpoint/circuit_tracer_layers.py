"""The per-layer tensors of a circuit-tracer folder, over every layer of the LLM.

circuit-tracer counts layers from 0 and takes its layer count from the number of files, so a CLT
or PLT trained on a subset of the LLM's layers (``data.layers``) is written over all of them. An
uncovered layer holds features that never fire (``W_enc = 0``, ``b_enc = -1``: the pre-activation
is -1 on every input, below ReLU's 0 and below the JumpReLU threshold 1 written with it) and zero
decoders and ``b_dec``: its reconstruction is zero, so circuit-tracer keeps the whole MLP output
of that layer as its error node. A covered CLT source writes its decoder rows at the offsets of
the covered targets (zeros at the uncovered ones). Covering every layer gives the plain layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch

from torchtitan_clt.protocols.transcoder import Transcoder

# fn(model, j) -> layer j's W_enc, b_enc, W_dec, b_dec, W_skip (protocols.model_spec.ExportLayout).
LayerTensors = Callable[[Transcoder, int], dict[str, "torch.Tensor | None"]]

NEVER_FIRE_BIAS = -1.0
NEVER_FIRE_THRESHOLD = 1.0


def covered_layers(model: Transcoder) -> list[int]:
    """The LLM layers the model reads, in increasing order (``args.layers``, else 0..L-1)."""
    a = model.args
    layers = [int(v) for v in (a.layers or range(a.n_layers))]
    if len(layers) != a.n_layers or layers != sorted(set(layers)):
        raise ValueError(f"model layers {layers}: expected {a.n_layers} distinct layers in increasing order.")
    return layers


def llm_layer_count(model: Transcoder, llm_n_layers: int | None = None, warn: bool = True) -> int:
    """How many layers the folder gets: the LLM's (``llm_n_layers``, else ``args.extra``), else
    up to the last covered layer, with a warning (circuit-tracer needs one file per LLM layer)."""
    layers = covered_layers(model)
    n = llm_n_layers if llm_n_layers is not None else model.args.extra.get("llm_n_layers")
    if n is None:
        if warn and layers != list(range(len(layers))):
            warnings.warn(
                f"circuit-tracer export: the LLM's layer count is unknown (pass llm_n_layers); "
                f"writing layers 0..{layers[-1]}. circuit-tracer needs one file per LLM layer.",
                stacklevel=3,
            )
        return layers[-1] + 1
    if int(n) <= layers[-1]:
        raise ValueError(f"llm_n_layers = {n}, but the model covers layer {layers[-1]}.")
    return int(n)


def _dead(F: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(F, d, dtype=dtype), torch.full((F,), NEVER_FIRE_BIAS, dtype=dtype)


def _prelude(model: Transcoder, tensors: LayerTensors, dtype: torch.dtype):
    """(LLM layer -> model layer, F, d_out, whether there is a skip path, the tensor writer)."""
    pos = {layer: j for j, layer in enumerate(covered_layers(model))}

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(dtype, copy=True).contiguous()  # a copy: a family may share tensors

    skip = tensors(model, 0)["W_skip"] is not None
    return pos, model.args.features_per_layer, model.args.d_out, skip, t


def clt_layers(
    model: Transcoder, tensors: LayerTensors, theta: torch.Tensor | None, n_llm: int, dtype: torch.dtype
) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(layer, W_enc_{l} file tensors, W_dec_{l} file tensors)`` for l in 0..n_llm-1;
    ``tensors(model, j)``: the family's layer-j tensors (``ModelSpec.export_layout``)."""
    layers = covered_layers(model)
    pos, F, d, skip, t = _prelude(model, tensors, dtype)
    for i in range(n_llm):
        j = pos.get(i)
        if j is None:
            w_dec = torch.zeros(F, n_llm - i, d, dtype=dtype)
            w_enc, b_enc = _dead(F, model.args.d_in, dtype)
            enc = {f"W_enc_{i}": w_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": torch.zeros(d, dtype=dtype)}
            th = torch.full((F,), NEVER_FIRE_THRESHOLD, dtype=dtype)
            w_skip = torch.zeros(model.args.d_in, d)
        else:
            w = tensors(model, j)
            # b_dec_{i} is the bias of target layer i (zero where nothing is reconstructed).
            enc = {f"W_enc_{i}": t(w["W_enc"]), f"b_enc_{i}": t(w["b_enc"]), f"b_dec_{i}": t(w["b_dec"])}
            src = w["W_dec"]  # [F, L - j, d]: targets layers[j], layers[j + 1], ...
            offsets = [layers[j + o] - i for o in range(src.shape[1])]
            if offsets == list(range(n_llm - i)):  # every later layer covered: the source as it is,
                w_dec = src  # cast to dtype by the writer (no whole copy of the layer's decoder)
            else:
                w_dec = torch.zeros(F, n_llm - i, d, dtype=dtype)
                w_dec[:, torch.tensor(offsets)] = t(src)
            th = t(theta[j]) if theta is not None else None
            w_skip = w["W_skip"]
        if skip:
            # [d_in, d_out], as the CLT's x @ W_skip[i]; load_clt does not read it (load_clt_skip does).
            enc[f"W_skip_{i}"] = t(w_skip)
        if theta is not None:
            enc[f"threshold_{i}"] = th
        w = src = w_skip = None  # layer j's tensors must not outlive the next one's gather (sharded_export)
        yield i, enc, {f"W_dec_{i}": w_dec.contiguous()}
        enc = w_dec = th = None  # resumed: the suspended frame must not hold layer j into the next gather


def plt_layers(
    model: Transcoder, tensors: LayerTensors, theta: torch.Tensor | None, n_llm: int, dtype: torch.dtype
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(layer, layer_{l} file tensors)`` for l in 0..n_llm-1 (``tensors`` as in ``clt_layers``)."""
    pos, F, d, skip, t = _prelude(model, tensors, dtype)
    for i in range(n_llm):
        j = pos.get(i)
        if j is None:
            w_enc, b_enc = _dead(F, model.args.d_in, dtype)
            sd = {"W_enc": w_enc, "W_dec": torch.zeros(F, d, dtype=dtype), "b_enc": b_enc}
            sd["b_dec"] = torch.zeros(d, dtype=dtype)
            th = torch.full((F,), NEVER_FIRE_THRESHOLD, dtype=dtype)
            w_skip = torch.zeros(model.args.d_in, d)
        else:
            w = tensors(model, j)
            sd = {k: t(w[k]) for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
            th = t(theta[j]) if theta is not None else None
            w_skip = w["W_skip"]
        if skip:
            # [d_out, d_in]: circuit-tracer's single-layer transcoder adds x @ W_skip.T.
            sd["W_skip"] = t(w_skip.T)
        if theta is not None:
            sd["activation_function.threshold"] = th
        w = w_skip = None  # as in clt_layers
        yield i, sd


def coverage_note(model: Transcoder, n_llm: int) -> dict[str, list[int]] | None:
    """Config keys saying which layers are covered (None when all are), with a warning."""
    layers = covered_layers(model)
    if layers == list(range(n_llm)):
        return None
    uncovered = [i for i in range(n_llm) if i not in set(layers)]
    warnings.warn(
        f"circuit-tracer export: the model covers LLM layers {layers} of {n_llm}; layers {uncovered} "
        "are written with features that never fire, so circuit-tracer keeps their MLPs as error nodes.",
        stacklevel=3,
    )
    return {"layers": layers, "uncovered_layers": uncovered}
