"""Weights & Biases (``[metrics] wandb = true``): the run's metrics, config, plots and exports.

Rank 0 only; ``wandb`` is imported only when asked (``pip install 'torchtitan_clt[wandb]'``).
The run id is made once and kept in the checkpoint (the trainer's ``TrainState``), so a resumed,
or preempted and requeued, run continues the same WandB run (``wandb.init(id=..., resume="allow")``).
``WANDB_MODE=offline`` (or ``metrics.wandb_mode = "offline"``) writes the run under
``<run folder>/wandb/`` with no network; ``wandb sync`` uploads it later.

Names: ``loss/total`` and ``loss/<term>``, ``train/<scalar>``, ``eval/<metric>`` (the evaluation's
``eval_*``), one chart per layer for the per-layer lists (``fvu_layer/00``, ``l0_layer/00``, ...),
``report/<plot>`` images at the end — the TensorBoard names, so the two read alike.
"""

from __future__ import annotations

import math
import re
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from torchtitan_clt.config import ConfigError
from torchtitan_clt.tools.logging import logger


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            "metrics.wandb = true needs the wandb package: pip install 'torchtitan_clt[wandb]' "
            "(or pip install wandb), or set --metrics.wandb=false."
        ) from e
    return wandb


def agree_run_id(saved: str) -> str:
    """The WandB run id: ``saved`` (from the checkpoint) or a new one made on rank 0, the same on
    every rank (a collective when distributed), so the checkpoint holds it as one shared state."""
    run_id = saved or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


def chart_values(record: dict[str, Any], terms: dict[str, Any]) -> dict[str, float]:
    """One logged record (``MetricsLogger.log``) as WandB keys -> numbers."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "step" or k.startswith("loss_"):  # loss_<term>: from ``terms`` below
            continue
        if isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)):
                    out[f"{k.removesuffix('_per_layer')}_layer/{i:02d}"] = x
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            if k == "loss":
                out["loss/total"] = v
            elif k.startswith("eval_"):
                out[f"eval/{k.removeprefix('eval_')}"] = v
            else:
                out[f"train/{k}"] = v
    out.update({f"loss/{k}": v for k, v in terms.items() if isinstance(v, (int, float))})
    return out


def artifact_name(run_name: str) -> str:
    """``<run name>-model`` in the characters WandB allows in an artifact name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-.") + "-model"


class WandbSink:
    """One WandB run for one run folder (build it on rank 0 only)."""

    def __init__(self, run_folder: str | Path, job_config, run_id: str):
        self.wandb = _import_wandb()
        from torchtitan_clt.config.manager import to_dict

        m = job_config.metrics
        self.run_folder = Path(run_folder)
        self.name = m.wandb_run_name or job_config.job.name
        self.log_artifacts = m.wandb_log_artifacts
        self.last_step = 0
        self.run = self.wandb.init(
            project=m.wandb_project,
            entity=m.wandb_entity or None,
            name=self.name,
            tags=list(m.wandb_tags) or None,
            mode=m.wandb_mode or None,
            id=run_id,
            resume="allow",
            dir=str(self.run_folder),
            config=to_dict(job_config),
            job_type="train",
        )
        logger.info(f"WandB run {run_id} ({self.run.settings.mode}) in {self.run_folder / 'wandb'}")

    def log(self, step: int, record: dict[str, Any], terms: dict[str, Any]) -> None:
        values = {k: v for k, v in chart_values(record, terms).items() if math.isfinite(float(v))}
        self.run.log(values, step=step)
        self.last_step = max(self.last_step, step)

    def log_report(self, plan_files: Callable[[Path, str], list] | None = None) -> None:
        """The end of the run: the report's plots as images and, when asked, the exports with a
        model card as an artifact: the files ``plan_files(run_folder, repo_id)`` lists
        (``checkpoint.hub.plan_upload``, what a Hub push holds; handed in by the trainer, as
        metrics never import checkpoint)."""
        report = self.run_folder / "report"
        images = {
            f"report/{p.stem}": self.wandb.Image(str(p)) for p in sorted(report.glob("*.png")) if p.is_file()
        }
        if images:
            self.run.log(images, step=self.last_step)
        if self.log_artifacts and plan_files is not None:
            self._log_artifact(plan_files)

    def _log_artifact(self, plan_files: Callable[[Path, str], list]) -> None:
        try:  # exports, report, training config, model card
            files = plan_files(self.run_folder, f"wandb/{artifact_name(self.name)}")
        except FileNotFoundError as e:
            logger.warning(f"metrics.wandb_log_artifacts: nothing to log ({e})")
            return
        art = self.wandb.Artifact(
            artifact_name(self.name),
            type="model",
            description=f"torchtitan_clt run {self.name}: exports, report and model card",
            metadata={"step": self.last_step},
        )
        for f in files:
            if f.source is not None:
                art.add_file(str(f.source), name=f.path_in_repo)
            else:
                with art.new_file(f.path_in_repo, mode="wb") as out:
                    out.write(f.content)
        self.run.log_artifact(art)
        logger.info(f"WandB artifact {art.name}: {len(files)} files")

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
            # finish returns before wandb's service has written everything (offline: the run's
            # .wandb log stays empty for seconds); teardown waits for it. A preempted run leaves
            # by os._exit right after this.
            self.wandb.teardown()
