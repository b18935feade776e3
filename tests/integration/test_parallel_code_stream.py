"""The ``code`` tensor-parallel layout on the stream source (issue 27): each rank's buffer holds
only its ``d_out / tp`` columns of y once the standardization is estimated (``ChunkShare.columns``
scatters them; the refill being drained at the switch is sliced), and the trainer standardizes,
reconstructs and measures those columns. Trained by ``run_train.sh`` on tp=2 from the tiny LLM,
the same run on the ``features`` layout (whole y on every rank, ŷ all-reduced) must log the same
losses (1e-5 relative: fp32 reordering) and FVU per layer, and the end-of-run export (TopK's
calibration rows are gathered whole again) must agree. A spy in the run's log checks the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

ARGS = [
    "--config", "train_configs/debug_model.toml", "--parallelism.tp=2", "--parallelism.dp_shard=1",
    "--training.steps=20", "--model.activation=topk", "--metrics.log_freq=1",
    "--metrics.enable_tensorboard=false", "--checkpoint.interval=1000", "--eval.enable=false",
]  # fmt: skip


def _run(folder: Path, layout: str) -> tuple[Path, str]:
    env = dict(os.environ, NGPU="2", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["MASTER_PORT"] = str(29500 + (os.getpid() + 7 * len(layout)) % 1000)
    cmd = ["bash", str(ROOT / "run_train.sh"), *ARGS, f"--job.dump_folder={folder}", f"--job.name={layout}",
           f"--parallelism.tp_layout={layout}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{layout}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return folder / layout, r.stdout + r.stderr


def _rows(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_code_layout_with_y_columns_trains_like_the_features_layout(tmp_path):
    (code_run, log), (feat_run, _) = _run(tmp_path, "code"), _run(tmp_path, "features")
    assert "columns (scattered by the data path)" in log, log[-3000:]
    code, feat = _rows(code_run), _rows(feat_run)
    assert sorted(code) == sorted(feat) == list(range(1, 21))
    for s in code:
        assert abs(code[s]["loss"] - feat[s]["loss"]) <= 1e-5 * max(1.0, abs(feat[s]["loss"])), s
        assert max(abs(a - b) for a, b in zip(code[s]["fvu_per_layer"], feat[s]["fvu_per_layer"])) <= 2e-5, s
    w, w_ref = (load_file(str(tmp_path / n / "export/model.safetensors")) for n in ("code", "features"))
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        assert (w[k].float() - w_ref[k].float()).abs().max().item() <= 1e-4, k
