"""``ModelSpec``: everything the trainer and the exporters need to know about a family, by name.

A family declares data, not code that reaches into other rooms: which parameter axis is the
feature axis (``tp_plan``, read by ``distributed.parallelize``) and which per-layer tensors its
weights give the per-layer export formats (``export_layout``, read by ``checkpoint.circuit_tracer``
and ``checkpoint.saelens``). So a family registered from a user's file (``job.custom_import``)
trains on a mesh and exports without a line of the package changing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchtitan_clt.protocols.registry import model_registry


def layerwise_tensors(model: Any, j: int) -> dict[str, torch.Tensor | None]:
    """Layer ``j``'s tensors of a model with ``W_enc [L, F, d_in]``, ``b_enc [L, F]``,
    ``W_dec`` (``[L, F, d_out]``, or a list of ``[F, L-j, d_out]`` for a crosslayer model),
    ``b_dec [L, d_out]`` and an optional ``W_skip [L, d_in, d_out]``."""
    skip = getattr(model, "W_skip", None)
    return {
        "W_enc": model.W_enc[j],  # [F, d_in]
        "b_enc": model.b_enc[j],  # [F]
        "W_dec": model.W_dec[j],  # [F, d_out] per layer, [F, L-j, d_out] crosslayer
        "b_dec": model.b_dec[j],  # [d_out]
        "W_skip": skip[j] if skip is not None else None,  # [d_in, d_out]: y += x @ W_skip
    }


@dataclass(frozen=True)
class ExportLayout:
    """How a family's weights map onto the per-layer formats (circuit-tracer, sae-lens)."""

    kind: Literal["crosslayer", "per_layer"]
    """``crosslayer``: layer j's features write to layers j..L-1 (circuit-tracer's CLT);
    ``per_layer``: to layer j only (circuit-tracer's transcoder set, sae-lens)."""

    layer_tensors: Callable[[Any, int], dict[str, torch.Tensor | None]] = layerwise_tensors
    """``fn(model, j)`` -> ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``W_skip`` (or None) of
    layer j, shaped as ``layerwise_tensors`` documents, on a folded single-device copy."""


@dataclass
class ModelSpec:
    name: str
    """Family name used as ``model.name``."""

    build_fn: Callable[..., Any]
    """``build_fn(args: TranscoderArgs) -> Transcoder``; called under the meta device."""

    tp_plan: dict[str, int | None] | None = None
    """Parameter name (regex) -> the axis sharded over tp (the feature axis), or None to
    replicate it. ``None`` for the whole plan: no tensor parallelism (data parallelism still works)."""

    tp_code_plan: dict[str, int | None] | None = None
    """The same for ``parallelism.tp_layout = "code"``: the encoder's parameters on their feature
    axis, the decoder's, the skip path's and ``b_dec`` on their ``d_out`` axis. ``None``: the
    family trains on tp only with the ``features`` layout."""

    tp_methods: dict[str, Any] | None = None
    """How the family's own methods run on a tp rank, beside the layout's table
    (``distributed.tensor_parallel.FEATURES_METHODS``, ``distributed.tp_code.CODE_METHODS``):
    method name -> a ``MethodStyle`` (e.g. ``LocalShards()`` for an extra method that reads the
    parameters, ``FeatureShardedOutput()`` for one returning per-feature values). Entries replace
    the layout's. ``None``: the table as it is."""

    parallelize_fn: Callable[..., Any] | None = None
    """``fn(model, parallel_dims, job_config) -> model``, for a family that needs more than
    ``tp_plan`` + FSDP2; ``None``: ``distributed.parallelize.parallelize_transcoder``."""

    activations: tuple[str, ...] | None = None
    """Activations this family supports (``None``: every registered one)."""

    export_layout: ExportLayout | None = None
    """``None``: native export only (``load_pretrained``)."""

    options: type | None = None
    """A dataclass of the family's own fields (typed, with defaults), set as [model] keys
    (``--model.<field>=value``) and handed to ``build_fn`` in ``TranscoderArgs.extra``."""

    description: str = ""
    """One line, listed when ``model.name`` is unknown."""


def family_options(spec: ModelSpec, model_cfg: Any) -> dict[str, Any]:
    """The family's options from the [model] keys the config did not know (``model.options``),
    checked against ``spec.options``, with its defaults for the rest."""
    import dataclasses
    import typing

    from torchtitan_clt.config.manager import FAMILY_OPTIONS, coerce, unknown_error

    given = dict(getattr(model_cfg, FAMILY_OPTIONS, None) or {})
    hints = typing.get_type_hints(spec.options) if spec.options is not None else {}
    for key in given:
        if key not in hints:
            fields = [f.name for f in dataclasses.fields(model_cfg) if f.name != FAMILY_OPTIONS]
            # The valid names: the [model] fields and this family's options.
            raise unknown_error("field in [model]", key, fields + list(hints))
    if spec.options is None:
        return {}
    values = {k: coerce(v, hints[k], f"model.{k}") for k, v in given.items()}
    return dataclasses.asdict(spec.options(**values))


def export_layout_of(model: Any) -> ExportLayout | None:
    """The export layout the family of ``model`` (``args.family``) declares, if any."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model_registry.get(model.args.family).export_layout


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    return model_registry.register(spec.name, spec)


def get_model_spec(name: str) -> ModelSpec:
    return model_registry.get(name)
