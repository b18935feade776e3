"""SAELens export: one folder per layer, ``layer_{l}/cfg.json`` + ``layer_{l}/sae_weights.safetensors``.

Written in the on-disk layout that sae-lens 6.x reads with ``SAE.load_from_disk(folder)`` (learned
from its ``saes/*.py`` and ``loading/pretrained_sae_loaders.py``; checked by
``tests/unit/test_saelens_export.py`` with sae-lens itself):

- weights: ``W_enc  # [d_in, F]`` (sae-lens computes ``x @ W_enc + b_enc``, so this is our
  ``W_enc[l]`` transposed), ``b_enc  # [F]``, ``W_dec  # [F, d_out]``, ``b_dec  # [d_out]`` and,
  for the JumpReLU architectures, ``threshold  # [F]`` (θ itself, not log θ);
- ``cfg.json``: the architecture's config fields at the top level (``architecture``, ``d_in``,
  ``d_sae``, ``dtype``, ``apply_b_dec_to_input = false``: our encoder reads x as it is, ``k`` for
  ``topk``, ``d_out`` for transcoders) and ``metadata`` (``sae_lens_version`` >= 6 so that the
  pre-6.0 config rewriting is skipped, ``model_name``, ``hook_name`` / ``hook_name_out`` in
  TransformerLens names, and where the folder came from).

Architectures: an SAE (``model.name = 'sae'``) goes to ``standard`` (ReLU), ``jumprelu``
(JumpReLU, and BatchTopK: in eval mode it *is* JumpReLU with its tracked threshold) or ``topk``; a
per-layer transcoder to ``transcoder`` (ReLU) or ``jumprelu_transcoder`` (JumpReLU, BatchTopK),
or, with a skip path (``model.skip_connection``), to ``skip_transcoder`` / ``jumprelu_skip_transcoder``
with ``W_skip  # [d_out, d_in]``.
sae-lens has no TopK transcoder and no crosslayer or MOLT form: those are refused with the reason.
Standardization is folded first, so every folder takes and gives raw activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.models.activations import ReLU, TopK
from torchtitan_clt.protocols.model_spec import export_layout_of
from torchtitan_clt.protocols.transcoder import Transcoder, dtype_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The sae-lens release whose layout this writes (recorded in each cfg.json's metadata).
SAELENS_FORMAT_VERSION = "6.54.0"
# Our hook points -> TransformerLens hook names (``blocks.{layer}.`` + name), as sae-lens uses them.
TL_HOOKS = {
    "resid_mid": "hook_resid_mid",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


class SAELensExportError(ConfigError):
    """The model has no sae-lens architecture; the message says why and what to use instead."""


def layer_folder_name(layer: int) -> str:
    return f"layer_{layer}"


def saelens_architecture(model: torch.nn.Module) -> str:
    """The sae-lens architecture ``model`` exports to, or SAELensExportError with the reason."""
    model = getattr(model, "_orig_mod", model)
    args = model.args
    what = f"model.name={args.family!r}, activation={args.activation!r}"
    layout = export_layout_of(model)
    if layout is not None and layout.kind == "crosslayer":
        raise SAELensExportError(
            f"{what}: a crosslayer transcoder's features write to every later layer, and sae-lens "
            "stores one encoder and one decoder per layer (SAEs and per-layer transcoders only). "
            "Use the native export (load_pretrained) or --format circuit_tracer, which loads CLTs."
        )
    if layout is None:
        raise SAELensExportError(
            f"{what}: sae-lens has no form for a {type(model).__name__} (it stores a linear "
            "encoder and decoder per layer); use the native export (load_pretrained)."
        )
    for hook in (args.hook_in, args.hook_out):
        if hook not in TL_HOOKS:
            raise SAELensExportError(
                f"{what}: hook point {hook!r} has no TransformerLens name (known: {', '.join(TL_HOOKS)})."
            )
    act = model.activation
    is_sae = args.hook_in == args.hook_out  # an SAE reconstructs its input
    # A skip transcoder (model.skip_connection) is sae-lens' skip variant of the same architecture.
    skip = "skip_" if layout.layer_tensors(model, 0)["W_skip"] is not None else ""
    if isinstance(act, ReLU):
        return "standard" if is_sae else f"{skip}transcoder"
    if isinstance(act, TopK):
        if is_sae:
            return "topk"
        raise SAELensExportError(
            f"{what}: sae-lens {SAELENS_FORMAT_VERSION} has no TopK transcoder architecture (only "
            "transcoder, jumprelu_transcoder and their skip variants). Use --format circuit_tracer "
            "(it converts TopK to JumpReLU on calibration text) or the native export."
        )
    if getattr(act, "jumprelu_equivalent", False) and hasattr(act, "feature_thresholds"):
        updates = getattr(act, "threshold_updates", None)
        if updates is not None and bool((updates == 0).any()):
            raise SAELensExportError(
                f"{what}: the inference threshold of layer(s) "
                f"{(updates == 0).nonzero().flatten().tolist()} was never estimated (it is tracked "
                "while training); train some steps before exporting."
            )
        return "jumprelu" if is_sae else f"jumprelu_{skip}transcoder"
    raise SAELensExportError(
        f"{what}: activation {type(act).__name__} is neither ReLU, JumpReLU nor TopK, the "
        "activations sae-lens can run; use the native export (load_pretrained)."
    )


def layer_config(
    model: Transcoder, i: int, architecture: str, dtype: torch.dtype, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The ``cfg.json`` of dictionary layer ``i``."""
    a = model.args
    layer = a.layers[i] if a.layers else i
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": a.d_in,
        "d_sae": a.features_per_layer,
        "dtype": dtype_name(dtype),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if architecture == "topk":
        cfg.update(k=min(a.k, a.features_per_layer), rescale_acts_by_decoder_norm=False)
    if architecture.endswith("transcoder"):
        cfg["d_out"] = a.d_out
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained with sae-lens
        "model_name": a.model_name,
        "hook_name": f"blocks.{layer}.{TL_HOOKS[a.hook_in]}",
        "prepend_bos": True,
    }
    if architecture.endswith("transcoder"):
        meta["hook_name_out"] = f"blocks.{layer}.{TL_HOOKS[a.hook_out]}"
    meta.update(
        exported_by="torchtitan_clt",
        family=a.family,
        trained_activation=a.activation,
        layer=layer,
        hook_in=a.hook_in,
        hook_out=a.hook_out,
    )
    meta.update(metadata)
    cfg["metadata"] = meta
    return cfg


def export_saelens(
    model: torch.nn.Module,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, Any] | None = None,
) -> Path | None:
    """Write one sae-lens folder per layer under ``folder``; returns ``folder`` on rank 0 (None
    elsewhere: every rank must call it when the model is sharded). ``model`` is left untouched.
    ``metadata``: more keys for each ``cfg.json``'s metadata (e.g. ``context_size``,
    ``dataset_path``)."""
    from torchtitan_clt.checkpoint.plain import folded_cpu_copy, is_rank0

    architecture = saelens_architecture(model)
    copy = folded_cpu_copy(model)  # fp32, standardization folded, eval mode
    if not is_rank0():
        return None
    a = copy.args
    theta = copy.activation.feature_thresholds().detach().float() if "jumprelu" in architecture else None
    if theta is not None and bool((theta < 0).any()):
        raise SAELensExportError("negative JumpReLU thresholds cannot be exported.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"layer_*/{WEIGHTS_FILE}"):
        stale.unlink()  # an earlier export of other layers must not leave loadable folders behind
        (stale.parent / CFG_FILE).unlink(missing_ok=True)

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(dtype, copy=True).contiguous()  # a copy: a family may share tensors

    tensors = export_layout_of(copy).layer_tensors
    with torch.no_grad():
        for i in range(a.n_layers):
            layer = a.layers[i] if a.layers else i
            sub = folder / layer_folder_name(layer)
            sub.mkdir(exist_ok=True)
            w = tensors(copy, i)
            sd = {
                "W_enc": t(w["W_enc"].T),  # [d_in, F]
                "b_enc": t(w["b_enc"]),
                "W_dec": t(w["W_dec"]),  # [F, d_out]
                "b_dec": t(w["b_dec"]),
            }
            if theta is not None:
                sd["threshold"] = t(theta[i])
            if w["W_skip"] is not None:
                sd["W_skip"] = t(w["W_skip"].T)  # [d_out, d_in]: sae-lens adds x @ W_skip.T
            save_file(sd, str(sub / WEIGHTS_FILE))
            cfg = layer_config(copy, i, architecture, dtype, dict(metadata or {}))
            (sub / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder
