"""Native export: ``model.safetensors`` + ``config.json``, standardization folded into the weights.

The exported model takes and gives raw activations (its standardization buffers are identity).
A model over ``max_file_gb`` is split into ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json`` (``checkpoint.safetensors_stream``); a sharded (DTensor) model
is streamed one source layer at a time (``checkpoint.sharded_export``), never gathered whole.
``load_pretrained(folder)`` rebuilds either layout for any registered family, in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from torchtitan_clt.checkpoint.plain import folded_cpu_copy, is_rank0, unwrap
from torchtitan_clt.checkpoint.safetensors_stream import (
    INDEX_FILE,
    WEIGHTS_FILE,
    StreamedExport,
    TensorSpec,
    weight_files,
)
from torchtitan_clt.config.manager import ConfigError, InputError
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs, dtype_name

FORMAT = "torchtitan_clt.native"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
DEFAULT_MAX_FILE_GB = 5.0  # checkpoint.export_max_file_gb; transformers' default shard size


def activation_info(model: Transcoder) -> dict[str, Any]:
    act = model.activation
    return {
        "name": model.args.activation,
        "class": type(act).__name__,
        # True: in eval mode it is exactly JumpReLU(θ = activation.feature_thresholds()) [L, F].
        "jumprelu_equivalent": bool(getattr(act, "jumprelu_equivalent", False)),
        "k": model.args.k,
        "batchtopk_scope": model.args.batchtopk_scope,
    }


def export_native(
    model: torch.nn.Module,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    extra_meta: dict[str, Any] | None = None,
    max_file_gb: float = DEFAULT_MAX_FILE_GB,
) -> Path | None:
    """Write the weights (``model.safetensors``, or shards + index past ``max_file_gb``) and
    ``config.json`` into ``folder``; returns the folder on rank 0 (None elsewhere: only rank 0
    writes, but every rank must call it when the model is sharded). A sharded model of a family
    with a per-layer fold is streamed one source layer at a time; any other is copied whole first."""
    from torchtitan_clt.checkpoint import sharded_export

    max_bytes = int(max_file_gb * 1e9)
    plan = sharded_export.layer_plan(model) if sharded_export.is_sharded(model) else None
    if plan is None:
        copy = folded_cpu_copy(model)
        if not is_rank0():
            return None
        copy.to(dtype)
        out = _open_weights(folder, copy.state_dict(), dtype, max_bytes)
        for name, value in copy.state_dict().items():
            out.write(name, value)
        out.close()
        return _write_config(folder, copy, dtype, extra_meta)
    stream = sharded_export.LayerStream(model, plan)
    out = _open_weights(folder, stream.state, dtype, max_bytes) if is_rank0() else None
    for j in range(stream.n_layers):
        layer = stream.layer(j)
        if out is not None:
            _write_layer(out, layer, j, plan.per_source)
        del layer  # nothing of layer j may outlive the gather of layer j + 1
    stream.release()
    if out is None:
        return None
    out.close()
    return _write_config(folder, unwrap(model), dtype, extra_meta)


def _write_layer(out: StreamedExport, layer: dict, j: int, whole: tuple[str, ...]) -> None:
    for name, value in layer.items():  # cast to ``dtype`` by the writer, a chunk at a time
        out.write(name, value, row=None if name in whole else j)


def _open_weights(folder: str | Path, state: dict, dtype: torch.dtype, max_bytes: int) -> StreamedExport:
    specs = [
        TensorSpec(k, dtype if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in state.items()
    ]
    return StreamedExport(Path(folder), specs, {"format": FORMAT}, max_bytes)


def _write_config(
    folder: str | Path, model: Transcoder, dtype: torch.dtype, extra_meta: dict[str, Any] | None
) -> Path:
    args = TranscoderArgs.from_dict(model.args.to_dict())
    args.dtype = dtype_name(dtype)
    folder = Path(folder)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": args.family,
        "standardization": "folded",
        "dtype": args.dtype,
        "model_name": args.model_name,
        "hook_in": args.hook_in,
        "hook_out": args.hook_out,
        "layers": list(args.layers),
        "activation": activation_info(model),
        "args": args.to_dict(),
        "meta": extra_meta or {},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transcoder:
    """Load a native export (any registered family) or a circuit-tracer folder in eval mode; takes
    and gives raw units. ``path``: a local folder or a Hub repo (``org/name``, ``org/name@rev``,
    ``hf://org/name/sub/folder``; see ``checkpoint.hub``)."""
    from torchtitan_clt.checkpoint.hub import resolve_pretrained

    folder = resolve_pretrained(path)
    if (folder / "config.yaml").is_file() and not (folder / CONFIG_FILE).is_file():
        from torchtitan_clt.checkpoint.circuit_tracer import load_circuit_tracer  # a circuit-tracer folder

        return load_circuit_tracer(folder, device=device, dtype=dtype)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / CONFIG_FILE} is missing: {folder} is not a complete native export "
            f"(it needs {CONFIG_FILE} and {WEIGHTS_FILE}, or {INDEX_FILE} and the files it names)."
        )
    files = weight_files(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not a {FORMAT} config (format={config.get('format')!r})."
        )
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{folder} has format_version {config['format_version']}; this torchtitan_clt reads up "
            f"to {FORMAT_VERSION}: upgrade torchtitan_clt."
        )
    args = TranscoderArgs.from_dict(config["args"])
    if args.family not in model_registry:
        raise ConfigError(
            f"{folder / CONFIG_FILE} names family {args.family!r}, which is not registered "
            f"(known: {', '.join(model_registry.names())}). If it is your own family, import the "
            "module that registers it before calling load_pretrained."
        )
    if dtype is not None:
        args.dtype = dtype_name(dtype)
    with torch.device("meta"):
        model = model_registry.get(args.family).build_fn(args)
    model.to_empty(device=device)
    model.load_state_dict(_read_weights(files, model))
    return model.eval()


def _read_weights(files: list[Path], model: Transcoder) -> dict[str, torch.Tensor]:
    """The tensors of ``files`` (one file, or the shards an index names), checked against the
    model its config.json describes."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise InputError(f"{path} does not read ({e}): the export is damaged; export it again.") from e
    file = files[0] if len(files) == 1 else files[0].parent / INDEX_FILE
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    shapes = [
        f"{k} {list(tensors[k].shape)} (expected {list(want[k])})"
        for k in want
        if k in tensors and tuple(tensors[k].shape) != want[k]
    ]
    if missing or extra or shapes:
        parts = [
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(extra)}" if extra else "",
        ]
        parts.append(f"wrong shapes: {'; '.join(shapes)}" if shapes else "")
        raise InputError(
            f"{file} does not match {file.parent / CONFIG_FILE} ({'; '.join(p for p in parts if p)}): the "
            "export is incomplete or was edited; export it again (scripts/export.py RUN_FOLDER)."
        )
    return tensors
