"""Resume across meshes on the ``code`` tensor-parallel layout (issue 27): a BatchTopK CLT with a
skip path trained by ``run_train.sh`` on tp=2 with ``parallelism.tp_layout = "code"`` saves a
checkpoint at step N; resumed from it on tp=4 (code layout) and on one process, steps N+1..2N
give the same losses as the uninterrupted tp=2 run, and the final exports agree. The distributed
checkpoint holds whole tensors, so the decoder's d_out sharding is undone on save and redone on
load. Tolerances as tests/integration/test_parallel.py (fp32 reordering only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
N = 5

ARGS = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(ROOT / "tests/integration/test_parallel.py"),
    "--data.source=dp_sliced_synthetic", "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
    "--model.name=clt", "--model.activation=batchtopk", "--model.batchtopk_scope=all", "--model.k=4",
    "--model.features_per_layer=32", "--model.skip_connection=true", "--loss.sparsity=none",
    f"--training.steps={2 * N}", "--training.batch_size=32", "--training.device=cpu",
    "--optimizer.lr=2e-2", "--lr_scheduler.warmup_steps=0", "--lr_scheduler.decay_ratio=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    f"--checkpoint.interval={N}", "--checkpoint.keep_latest_k=0", "--checkpoint.export=true",
    "--checkpoint.export_calibration_tokens=0", "--parallelism.tp_layout=code",
]  # fmt: skip


def run(folder: Path, name: str, ngpu: int, extra: list[str]) -> Path:
    env = dict(os.environ, NGPU=str(ngpu), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["MASTER_PORT"] = str(29500 + (os.getpid() + 11 * ngpu) % 1000)
    cmd = [
        "bash",
        str(ROOT / "run_train.sh"),
        *ARGS,
        f"--job.dump_folder={folder}",
        f"--job.name={name}",
        *extra,
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return folder / name


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def fvus(run_dir: Path) -> dict[int, list[float]]:
    """FVU per layer of each step: on the code layout each rank sums its own columns of y and ŷ
    (the trainer slices y), reduced over tp in ``FVUAccumulator.compute``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["fvu_per_layer"] for r in rows if "fvu_per_layer" in r}


@pytest.mark.slow
def test_code_layout_resumes_on_tp4_and_one_process(tmp_path):
    tp2 = ["--parallelism.dp_shard=1", "--parallelism.tp=2"]
    full = run(tmp_path, "tp2", 2, tp2)
    want = losses(full)
    assert sorted(want) == list(range(1, 2 * N + 1))
    for name, ngpu, mesh in (("tp4", 4, ["--parallelism.dp_shard=1", "--parallelism.tp=4"]), ("one", 1, [])):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copytree(full / "checkpoints" / f"step-{N}", folder / name / "checkpoints" / f"step-{N}")
        resumed = run(folder, name, ngpu, mesh)
        got = losses(resumed)
        assert sorted(got) == list(range(N + 1, 2 * N + 1)), (name, sorted(got))
        for step in got:
            assert abs(got[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (name, step)
        f_got, f_want = fvus(resumed), fvus(full)
        for step in got:  # logged rounded to 5 decimals
            assert max(abs(a - b) for a, b in zip(f_got[step], f_want[step])) <= 2e-5, (name, step)
        w, w_ref = (
            load_file(str(resumed / "export/model.safetensors")),
            load_file(str(full / "export/model.safetensors")),
        )
        assert w.keys() == w_ref.keys()
        for k in w_ref:
            assert (w[k].float() - w_ref[k].float()).abs().max().item() <= 1e-4, (name, k)
