"""Load a ``JobConfig`` from TOML plus ``--section.field=value`` overrides, validate it, print help.

Every problem is reported before any work starts, naming the field and what it accepts.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from torchtitan_clt.config.job_config import SKIP_FAMILIES, JobConfig
from torchtitan_clt.errors import ConfigError, InputError  # noqa: F401  (importable from here too)

HELP_HINT = "Run `./run_train.sh --help` to list every field with its documentation."
FAMILY_OPTIONS = "options"  # Model's dict of a user family's own fields


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written right under each dataclass field (read from the source)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _sections(cfg_cls: type = JobConfig) -> dict[str, type]:
    hints = typing.get_type_hints(cfg_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, from_cli: bool) -> Any:
    """Check ``value`` against ``tp``; CLI strings are parsed into it."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and "true" in choices:
            value = str(value).lower()  # TOML true / false for an "auto" / "true" / "false" switch
        if from_cli and isinstance(value, str) and not isinstance(choices[0], str):
            value = _coerce(value, type(choices[0]), where, True)
        if value not in choices:
            raise ConfigError(
                f"{where} = {value!r} is not valid: choose one of {', '.join(map(repr, choices))}."
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if from_cli and isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]").split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} expects a list of {item_tp.__name__}, got {value!r}.")
        return [_coerce(v, item_tp, f"{where}[{i}]", from_cli) for i, v in enumerate(value)]
    if tp is bool:
        if from_cli and isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects true or false, got {value!r}.")
    if tp is int:
        if from_cli and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects an integer, got {value!r}.")
    if tp is float:
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} expects a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} expects a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def unknown_error(kind: str, name: str, known: list[str]) -> ConfigError:
    """``Unknown <kind> <name>.`` with the closest valid name, the valid ones and the help hint."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown {kind} {name!r}.{hint} Valid: {', '.join(known)}. {HELP_HINT}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against ``tp`` (a string is parsed as from the command line); for fields
    the loader cannot know in advance: a user family's options (``ModelSpec.options``)."""
    return _coerce(value, tp, where, isinstance(value, str))


def _apply(cfg: Any, section: str, key: str, value: Any, from_cli: bool, cfg_cls: type) -> None:
    sections = _sections(cfg_cls)
    if section not in sections:
        raise unknown_error("config section", section, list(sections))
    sec_cls = sections[section]
    hints = typing.get_type_hints(sec_cls)
    if section == "model" and key == FAMILY_OPTIONS:
        raise ConfigError(
            f"set a family's options as model fields of their own: --model.<option>=value. {HELP_HINT}"
        )
    if key not in hints:
        if section == "model" and hasattr(cfg.model, FAMILY_OPTIONS):
            # Maybe an option of a family that job.custom_import registers: kept, and checked
            # against the family's ModelSpec.options once it is imported (_check_options here
            # refuses it when nothing is imported).
            cfg.model.options[key] = value
            return
        raise unknown_error(f"field in [{section}]", key, list(hints))
    where = f"{section}.{key}"
    setattr(getattr(cfg, section), key, _coerce(value, hints[key], where, from_cli))


def _check_options(cfg: Any) -> None:
    """Unknown [model] keys are a user family's options only when a module is imported."""
    options = getattr(getattr(cfg, "model", None), FAMILY_OPTIONS, None)
    if options and not cfg.job.custom_import:
        hints = [k for k in typing.get_type_hints(type(cfg.model)) if k != FAMILY_OPTIONS]
        raise unknown_error("field in [model]", next(iter(options)), hints)


def _parse_cli(args: list[str]) -> list[tuple[str, str]]:
    """``--a.b=v``, ``--a.b v`` or a bare ``--a.b`` (true) into (dotted key, string value)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"Cannot read argument {arg!r}: write overrides as --section.field=value. {HELP_HINT}"
            )
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                val = args[i + 1]
                i += 1
            else:
                val = "true"
        out.append((key, val))
        i += 1
    return out


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    t, m, d = cfg.training, cfg.model, cfg.data

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(t.steps > 0, f"training.steps must be positive, got {t.steps}.")
    need(t.batch_size > 0, f"training.batch_size must be positive, got {t.batch_size}.")
    need(t.grad_accum_steps > 0, "training.grad_accum_steps must be positive.")
    need(
        t.mixed_precision != "fp16",
        'training.mixed_precision = "fp16" is not supported: fp16 needs loss scaling (a GradScaler), '
        "which this trainer does not do, and its narrow range overflows unscaled. Use "
        '"bf16" (fp32\'s range, no scaling; any GPU since Ampere) or "fp32".',
    )
    need(cfg.loss.dead_after_tokens >= 0, "loss.dead_after_tokens must be >= 0 (0: auto).")
    need(cfg.loss.auxk_alpha >= 0, f"loss.auxk_alpha must be >= 0 (0: off), got {cfg.loss.auxk_alpha}.")
    need(
        t.batch_size % t.grad_accum_steps == 0,
        f"training.batch_size ({t.batch_size}) must be divisible by training.grad_accum_steps "
        f"({t.grad_accum_steps}).",
    )
    need(m.features_per_layer > 0, "model.features_per_layer must be positive.")
    need(m.k > 0, "model.k must be positive.")
    need(d.seq_len >= 2, "data.seq_len must be at least 2 (position 0 is BOS and never trained on).")
    need(
        d.buffer_tokens > 0 and d.llm_batch_size > 0,
        "data.buffer_tokens and data.llm_batch_size must be positive.",
    )
    need(d.buffer_passes >= 1, "data.buffer_passes must be at least 1.")
    need(
        0 <= cfg.eval.feature_skip_positions < d.seq_len - 1,
        f"eval.feature_skip_positions = {cfg.eval.feature_skip_positions} must be in [0, data.seq_len - 1 = "
        f"{d.seq_len - 1}): the window needs a position left to take feature examples from.",
    )
    need(all(layer >= 0 for layer in d.layers), f"data.layers must be non-negative, got {d.layers}.")
    need(len(set(d.layers)) == len(d.layers), f"data.layers has duplicates: {d.layers}.")
    need(0 <= cfg.lr_scheduler.decay_ratio <= 1, "lr_scheduler.decay_ratio must be in [0, 1].")
    need(
        cfg.lr_scheduler.warmup_steps <= t.steps,
        f"lr_scheduler.warmup_steps ({cfg.lr_scheduler.warmup_steps}) exceeds training.steps ({t.steps}): lower it.",
    )
    need(cfg.optimizer.lr > 0, "optimizer.lr must be positive.")
    need(cfg.metrics.log_freq > 0, "metrics.log_freq must be positive.")
    need(cfg.checkpoint.interval > 0, "checkpoint.interval must be positive.")
    need(cfg.loss.lambda_sparsity >= 0, "loss.lambda_sparsity must be non-negative.")
    need(m.jumprelu_bandwidth > 0, "model.jumprelu_bandwidth must be positive.")
    need(0 <= m.threshold_ema_decay < 1, "model.threshold_ema_decay must be in [0, 1).")  # as the activation
    need(m.jumprelu_threshold_init > 0, "model.jumprelu_threshold_init must be positive.")
    need(
        m.skip_connection != "true" or m.name in SKIP_FAMILIES,
        f"model.skip_connection is for {', '.join(SKIP_FAMILIES)} (got model.name = {m.name!r}): an "
        "SAE's skip path would be the identity and a MOLT's transforms are linear maps already; set "
        'model.skip_connection = "false" (or "auto").',
    )


def load_config(args: list[str] | None = None, cfg_cls: type = JobConfig, check: bool = True) -> JobConfig:
    """Build the config from ``--config FILE`` (optional) and ``--section.field=value`` overrides."""
    args = list(sys.argv[1:] if args is None else args)
    path = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config" or args[i] == "--job.config_file":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a TOML file path.")
            path = args[i + 1]
            i += 2
        elif args[i].startswith("--config="):
            path = args[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(args[i])
            i += 1
    cfg = cfg_cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file {path!r} does not exist (see train_configs/ for presets).")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Config file {path!r} is not valid TOML: {e}") from e
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table. {HELP_HINT}")
            for key, value in table.items():
                _apply(cfg, section, key, value, False, cfg_cls)
    for dotted, value in _parse_cli(rest):
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, value, True, cfg_cls)
    _check_options(cfg)
    if check:
        validate(cfg)
    return cfg


def to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML (what ``config.toml`` in the run folder holds)."""
    import json

    lines: list[str] = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        if section == "model":  # a family's options are [model] keys like the others
            options = table.pop(FAMILY_OPTIONS, {})
            table = {**table, **options}
        for key, value in table.items():
            # JSON literals are valid TOML for str / int / float / bool / flat lists.
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def help_text(cfg_cls: type = JobConfig) -> str:
    out = [
        "usage: ./run_train.sh [--config FILE.toml] [--section.field=value ...]",
        "",
        "Every field, with its type and default. TOML sets them under [section];",
        "the command line overrides them as --section.field=value.",
    ]
    defaults = cfg_cls()
    for section, sec_cls in _sections(cfg_cls).items():
        out.append(f"\n[{section}]")
        docs = field_docs(sec_cls)
        hints = typing.get_type_hints(sec_cls)
        for f in dataclasses.fields(sec_cls):
            default = getattr(getattr(defaults, section), f.name)
            out.append(f"  --{section}.{f.name}  ({_type_name(hints[f.name])}, default {default!r})")
            if f.name in docs:
                out.append(f"      {docs[f.name]}")
    return "\n".join(out)
