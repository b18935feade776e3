"""The on-disk layout of a checkpoint folder (see ``manager``): names, listing, and finding a
checkpoint from a ``step-N`` folder or a run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torchtitan_clt.config.manager import InputError

STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
META_FILE = "meta.json"
STATES_DIR = "states"


def list_checkpoints(folder: str | Path) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) in ``folder``, each sorted ascending."""
    folder = Path(folder)
    done, partial = [], []
    if not folder.is_dir():
        return done, partial
    for p in folder.iterdir():
        if m := STEP_DIR.match(p.name):
            # Renamed only when complete; meta.json guards against a half-copied folder.
            (done if (p / META_FILE).is_file() and (p / ".metadata").is_file() else partial).append(
                int(m.group(1))
            )
        elif m := TMP_DIR.match(p.name):
            partial.append(int(m.group(1)))
    return sorted(done), sorted(partial)


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step}"


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None) from a ``step-N`` folder or a run folder (latest
    complete step, or ``step``)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        if step is not None and json.loads((path / META_FILE).read_text())["step"] != step:
            raise InputError(
                f"{path} holds step {json.loads((path / META_FILE).read_text())['step']}, not {step}."
            )
        run = path.parent.parent
        return path, run if (run / "config.toml").is_file() else None
    if TMP_DIR.match(path.name):
        raise InputError(f"{path} is an incomplete checkpoint (the save was interrupted); use another step.")
    if not (path / "config.toml").is_file():
        raise FileNotFoundError(
            f"{path} is neither a checkpoint (step-N folder with {META_FILE}) nor a run folder (with config.toml)."
        )
    from torchtitan_clt.config.manager import load_config

    cfg = load_config(["--config", str(path / "config.toml")], check=False)
    folder = path / cfg.checkpoint.folder
    done, _ = list_checkpoints(folder)
    if not done:
        raise FileNotFoundError(f"{folder} holds no complete checkpoint.")
    if step is None:
        step = done[-1]
    if step not in done:
        raise InputError(f"no complete checkpoint of step {step} in {folder} (complete: {done}).")
    return checkpoint_path(folder, step), path


def run_complete(cfg: Any) -> str | None:
    """A line saying the run folder already holds this config's finished run (its last checkpoint
    at ``training.steps`` and the end-of-run outputs written after it), else None: relaunching the
    command of a finished run then says so instead of rewriting its report and exports."""
    c = cfg.checkpoint
    if not c.enable or c.fresh_start:
        return None
    run = Path(cfg.job.dump_folder) / cfg.job.name
    done, _ = list_checkpoints(run / c.folder)
    if not done or done[-1] < cfg.training.steps:
        return None
    saved = (checkpoint_path(run / c.folder, done[-1]) / META_FILE).stat().st_mtime
    outputs = [run / "report" / "eval.json"]
    outputs += [run / "export" / "config.json"] if c.export else []
    outputs += [run / "features" / "summary.json"] if cfg.eval.feature_examples_tokens > 0 else []
    if not all(p.is_file() and p.stat().st_mtime >= saved for p in outputs):
        return None  # stopped during the end of run: the relaunch finishes it
    return (
        f"{run} is complete (step {done[-1]} of {cfg.training.steps}): its report, exports and feature "
        f"examples are there. Nothing to do; raise --training.steps to train on, or start over with "
        "--checkpoint.fresh_start=true."
    )
