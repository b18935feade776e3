"""Check a config before any worker starts: ``python -m torchtitan_clt.config.check --config FILE
[--section.field=value ...]``. Exit 0 when it loads and validates, else one line and exit 2.

``run_train.sh`` runs it before torchrun (through ``torchtitan_clt.prelaunch``, which also says when
the run is already complete), so a typo costs a fraction of a second (this imports no torch)
instead of a launch of every rank. Besides the config's own validation it checks what the
run will read, from files alone: the dataset path, the layer indices against the LLM's
``config.json`` (or a GGUF file's header), built-in names (case, did-you-mean), and that an
end-of-run pass needing the LLM (eval, feature examples, circuit-tracer calibration) has an LLM as
wide as a synthetic source's dictionary. What needs the registries of user code still runs in the
trainer, which reports it the same way.
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from torchtitan_clt.config.manager import HELP_HINT, ConfigError, load_config

# The built-in names of the registries (protocols/registry.py; test_launcher_errors checks these
# against the registries themselves), known here without importing torch.
BUILTIN_NAMES = {
    "model.name": ("clt", "plt", "sae", "molt", "matryoshka_clt"),
    "model.activation": ("relu", "jumprelu", "topk", "batchtopk"),
    "data.source": ("stream", "cache", "synthetic"),
}


def check_names(cfg: Any) -> None:
    """A built-in name in the wrong case, or a near miss, with no user module that could register
    it: refused with the name meant."""
    for where, names in BUILTIN_NAMES.items():
        section, field = where.split(".")
        value = getattr(getattr(cfg, section), field)
        if value in names or (cfg.job.custom_import and value.lower() not in names):
            continue
        close = difflib.get_close_matches(value.lower(), names, n=1)
        case = " (names are lower case)" if value.lower() in names else ""
        hint = f" Did you mean {close[0]!r}?{case}" if close else ""
        raise ConfigError(
            f"{where} = {value!r} is not a built-in name.{hint} Choose one of {', '.join(names)}, or "
            f"register your own from a module named in job.custom_import. {HELP_HINT}"
        )


def _text_module() -> Any:
    """``torchtitan_clt/data/text.py`` alone (its package's ``__init__`` imports torch)."""
    path = Path(__file__).resolve().parents[1] / "data" / "text.py"
    spec = importlib.util.spec_from_file_location("_tclt_check_text", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_dataset(cfg: Any) -> None:
    """A local dataset path (file, folder or glob) that names nothing: the loader's own message."""
    if cfg.data.source != "stream" and not cfg.eval.enable and cfg.eval.feature_examples_tokens == 0:
        return
    text = None
    for where, name in (("data.dataset", cfg.data.dataset), ("eval.dataset", cfg.eval.dataset)):
        if name in ("", "shakespeare"):
            continue
        text = text or _text_module()
        try:
            text.local_files(name)  # raises ConfigError for a path that names nothing
        except ConfigError as e:
            raise ConfigError(str(e).replace("data.dataset", where, 1)) from None


def _gguf_file(spec: str) -> Path | None:
    """``gguf:<file>`` or ``gguf:<package>/<file>`` -> the file (as ``data/llm.resolve_gguf``)."""
    target = os.path.expanduser(spec[len("gguf:") :])
    if os.path.isfile(target):
        return Path(target)
    package, _, rest = target.partition("/")
    found = importlib.util.find_spec(package) if package and rest else None
    if found is not None and found.submodule_search_locations:
        path = Path(list(found.submodule_search_locations)[0]) / rest
        return path if path.is_file() else None
    return None


def gguf_header(path: Path) -> dict[str, Any]:
    """The scalar key-value metadata of a GGUF file (arrays skipped), read from its header."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    out: dict[str, Any] = {}
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            n = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(n))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, n = read("I"), read("Q")
                if item in scalars:
                    f.seek(n * struct.calcsize("<" + scalars[item]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return None
            return read(scalars[kind])

        if f.read(4) != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file (no GGUF magic).")
        read("I")  # version
        read("Q")  # tensors
        for _ in range(read("Q")):
            key = string()
            out[key] = value(read("I"))
    return out


def llm_shape(model_path: str) -> tuple[int, int] | None:
    """(layers, width) of ``data.model_path`` from files alone: a local folder's or the hub
    cache's ``config.json``, a GGUF file's cached conversion or its header; None when unknown
    without loading or downloading (the trainer checks it then)."""
    if model_path.startswith("gguf:"):
        path = _gguf_file(model_path)
        if path is None:
            return None
        cache = Path(os.environ.get("TCLT_CACHE") or Path.home() / ".cache" / "torchtitan_clt")
        if not (cache / path.stem / "config.json").is_file():
            meta = gguf_header(path)
            arch = meta.get("general.architecture", "")
            n, d = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
            return (int(n), int(d)) if n and d else None
        configs = [cache / path.stem / "config.json"]
    elif os.path.isdir(os.path.expanduser(model_path)):
        configs = [Path(os.path.expanduser(model_path)) / "config.json"]
    else:
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
        )
        repo = "models--" + model_path.replace("/", "--")
        configs = [
            Path(p) for p in sorted(glob.glob(os.path.join(hub, repo, "snapshots", "*", "config.json")))
        ]
    for p in configs:
        if p.is_file():
            c = json.loads(p.read_text())
            c = c.get("text_config", c)
            n = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
            d = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
            return (int(n), int(d)) if n and d else None
    return None


def check_llm(cfg: Any) -> None:
    """Layer indices within the LLM; a synthetic source's width and layer count equal to the LLM's
    when an end-of-run pass reads the LLM (its activations go through the dictionary)."""
    d, e, c = cfg.data, cfg.eval, cfg.checkpoint
    passes = [
        name
        for name, on in (
            ("eval.enable", e.enable),
            ("eval.feature_examples_tokens", e.feature_examples_tokens > 0),
            (
                "checkpoint.export_circuit_tracer",
                c.export_circuit_tracer and cfg.model.activation in ("topk", "batchtopk"),
            ),
        )
        if on
    ]
    if d.source == "synthetic" and not passes:
        return
    shape = llm_shape(d.model_path)
    if shape is None:
        return
    n_layers, width = shape
    bad = [layer for layer in d.layers if layer >= n_layers]
    if bad and d.source != "synthetic":
        raise ConfigError(
            f"data.layers = {d.layers}: {d.model_path} has {n_layers} layers (0-{n_layers - 1}, from its "
            f"config), so {bad} do not exist."
        )
    if d.source == "synthetic":
        covered = len(d.layers) or n_layers
        if (d.synthetic_d_model, d.synthetic_n_layers) != (width, covered):
            raise ConfigError(
                f"data.source = 'synthetic' trains a dictionary of {d.synthetic_n_layers} layers of width "
                f"{d.synthetic_d_model}, but {', '.join(passes)} run it on {d.model_path} ({covered} layers of "
                f"width {width}) at the end. Turn them off (--eval.enable=false "
                "--eval.feature_examples_tokens=0 --checkpoint.export_circuit_tracer=false) or set "
                f"--data.synthetic_d_model={width} --data.synthetic_n_layers={covered}."
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        return 0
    try:
        cfg = load_config(argv)
        check_names(cfg)
        check_dataset(cfg)
        check_llm(cfg)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
