"""What the trace and feature scripts need from a run or an export: the dictionary, the run's
config (its LLM and text) and a local Hugging Face folder of that LLM.

``RUN_OR_EXPORT`` may be a run folder (``outputs/<job>``, with ``config.toml``), a checkpoint
``step-N`` folder, a native export (``export/``) or a circuit-tracer folder (``circuit_tracer/``,
``exports/step-N/circuit_tracer``); the run of an export is found among its parents.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def find_run(path: str | Path) -> Path | None:
    """The run folder (with ``config.toml``) that is ``path`` or one of its parents (3 levels)."""
    p = Path(path).resolve()
    for cand in [p, *list(p.parents)[:3]]:
        if (cand / "config.toml").is_file():
            return cand
    return None


def run_config(run: Path | None, model_path: str | None = None, dataset: str | None = None) -> Any:
    """The run's JobConfig (defaults without a run), with ``data.model_path`` / ``data.dataset``
    overridden when given."""
    from torchtitan_clt.config.manager import ConfigError, load_config

    argv = ["--config", str(run / "config.toml")] if run is not None else []
    if model_path:
        argv.append(f"--data.model_path={model_path}")
    if dataset:
        argv.append(f"--data.dataset={dataset}")
    cfg = load_config(argv, check=False)
    if run is None and not model_path:
        raise ConfigError(
            "no run folder (config.toml) above the given path: name the LLM with --model "
            "(a local folder, gguf:<file>, or a hub name) and the text with --data."
        )
    return cfg


def load_dictionary(path: str | Path, prefer_circuit_tracer: bool = True):
    """(transcoder in eval mode on the CPU, where it came from) for any ``RUN_OR_EXPORT``.

    From a run folder: its ``circuit_tracer/`` (what circuit-tracer sees, a TopK / BatchTopK model
    already in its JumpReLU form) when ``prefer_circuit_tracer``, else ``export/``, else the latest
    checkpoint."""
    from torchtitan_clt.checkpoint.circuit_tracer import is_circuit_tracer_folder, load_circuit_tracer
    from torchtitan_clt.checkpoint.export import load_pretrained
    from torchtitan_clt.checkpoint.layout import META_FILE
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint

    p = Path(path)
    if (p / "config.toml").is_file():
        if prefer_circuit_tracer and is_circuit_tracer_folder(p / "circuit_tracer"):
            return load_circuit_tracer(p / "circuit_tracer"), p / "circuit_tracer"
        if (p / "export" / "config.json").is_file():
            return load_pretrained(p / "export"), p / "export"
        return load_model_from_checkpoint(p)[0], p
    if (p / META_FILE).is_file():
        return load_model_from_checkpoint(p)[0], p
    return load_pretrained(p), p


def circuit_tracer_folder(path: str | Path) -> Path | None:
    """The circuit-tracer folder of ``RUN_OR_EXPORT``; None for a run that has none (export it
    with ``scripts/export.py RUN --format circuit_tracer``)."""
    from torchtitan_clt.checkpoint.circuit_tracer import is_circuit_tracer_folder

    p = Path(path)
    if is_circuit_tracer_folder(p):
        return p
    if is_circuit_tracer_folder(p / "circuit_tracer"):
        return p / "circuit_tracer"
    if (p / "config.toml").is_file():
        return None
    raise FileNotFoundError(
        f"{p} is neither a circuit-tracer folder nor a run folder (config.toml); give "
        "outputs/<job>, outputs/<job>/circuit_tracer or an exports/step-N/circuit_tracer folder."
    )


def hf_folder(model_path: str) -> str:
    """A local folder (or hub name) that ``from_pretrained`` loads with weights: ``gguf:`` gives
    its cached safetensors conversion; a config-only folder (tests' tiny random models) gets its
    seeded random weights saved once into the cache, so the LLM is the one the run read."""
    from torchtitan_clt.data.llm import (
        _WEIGHT_FILES,
        RANDOM_INIT_SEED,
        cache_root,
        load_llm,
        local_folder,
        prepare_gguf,
    )

    if model_path.startswith("gguf:"):
        return str(prepare_gguf(model_path))
    folder = local_folder(model_path)
    if folder is None or any((folder / f).is_file() for f in _WEIGHT_FILES):
        return str(folder or model_path)
    digest = hashlib.sha1((folder / "config.json").read_bytes()).hexdigest()[:12]
    target = cache_root() / f"random-{RANDOM_INIT_SEED}-{folder.resolve().name}-{digest}"
    if not (target / "model.safetensors").is_file():
        llm, tok = load_llm(model_path, "float32", "cpu")
        llm.save_pretrained(target, safe_serialization=True)
        tok.save_pretrained(target)
    return str(target)
