"""A run logging to WandB (``WANDB_MODE=offline``) that is stopped by SIGTERM and relaunched
continues the same WandB run: one run id (kept in the checkpoint), the first launch's history up
to the step it saved, the second's from the next step to the end with the losses of
``metrics.jsonl``, the resolved config, and at the end the report's plots and the exports with
their model card as an artifact. Read back from wandb's own offline log (``tests/wandb_offline.py``)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: wandb_offline
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_preemption

from test_preemption import LAUNCH, T, _losses, _start, _wait_for  # noqa: E402
from wandb_offline import offline_runs, read_run  # noqa: E402

pytest.importorskip("wandb")

WANDB = [
    "--metrics.wandb=true", "--metrics.wandb_run_name=wb_resume", "--metrics.wandb_tags=[ci]",
    "--metrics.wandb_log_artifacts=true", "--checkpoint.export=true",
]  # fmt: skip
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.mark.slow
def test_sigterm_and_resume_continue_the_same_wandb_run(tmp_path):
    run = tmp_path / "wb"
    proc = _start(LAUNCH, tmp_path, "wb", *WANDB, **ENV)
    _wait_for(lambda: max(_losses(run), default=0) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    stopped = max(_losses(run))
    assert stopped < T

    proc = _start(LAUNCH, tmp_path, "wb", *WANDB, **ENV)  # the same command resumes
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    first, second = (read_run(f) for f in offline_runs(run))
    assert first["id"] == second["id"] and len(first["id"]) == 8
    assert first["name"] == second["name"] == "wb_resume" and second["tags"] == ["ci"]
    assert sorted(first["history"]) == list(range(1, stopped + 1))
    assert sorted(second["history"]) == list(range(stopped + 1, T + 1))
    losses = _losses(run)  # metrics.jsonl: the first launch's rows up to `stopped`, then the second's
    for hist in (first["history"], second["history"]):
        for step, row in hist.items():
            assert row["loss/total"] == pytest.approx(losses[step], rel=1e-6)
            assert {"fvu_layer/00", "fvu_layer/02", "l0_layer/01", "train/lr", "loss/sparsity"} <= row.keys()
    assert second["config"]["training"]["steps"] == T
    assert second["config"]["metrics"]["wandb_run_name"] == "wb_resume"

    end = second["history"][T]  # the report's plots, at the last step
    plots = sorted(p.stem for p in (run / "report").glob("*.png"))
    assert plots and all(end[f"report/{p}/_type"] == "image-file" for p in plots)
    (art,) = second["artifacts"]
    assert art["name"] == "wb_resume-model" and art["type"] == "model"
    assert {"model.safetensors", "config.json", "README.md", "training_config.toml"} <= set(art["files"])
    assert not first["artifacts"]  # nothing at the preemption
    json.dumps(second["config"])  # the resolved config is plain data
