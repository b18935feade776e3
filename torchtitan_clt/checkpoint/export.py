"""Native export: ``model.safetensors`` + ``config.json``, standardization folded into the weights.

The exported model takes and gives raw activations (its standardization buffers are identity).
``load_pretrained(folder)`` rebuilds it for any registered family, in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from torchtitan_clt.checkpoint.plain import folded_cpu_copy, is_rank0
from torchtitan_clt.config.manager import ConfigError, InputError
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs, dtype_name

FORMAT = "torchtitan_clt.native"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
) -> Path | None:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder on rank 0
    (None elsewhere: only rank 0 writes, but every rank must call it to gather sharded weights)."""
    copy = folded_cpu_copy(model)
    if not is_rank0():
        return None
    copy.to(dtype)
    args = TranscoderArgs.from_dict(copy.args.to_dict())
    args.dtype = dtype_name(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in copy.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
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
        "activation": activation_info(copy),
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
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / fname).is_file():
            raise FileNotFoundError(
                f"{folder / fname} is missing: {folder} is not a complete native export "
                f"(it needs {CONFIG_FILE} and {WEIGHTS_FILE})."
            )
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
    model.load_state_dict(_read_weights(folder / WEIGHTS_FILE, model))
    return model.eval()


def _read_weights(file: Path, model: Transcoder) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, checked against the model its config.json describes."""
    try:
        tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{file} does not read ({e}): the export is damaged; export it again.") from e
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
