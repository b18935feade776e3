"""``scripts/slurm_train.sh`` with stand-ins for ``srun`` / ``scontrol`` on PATH (no training: the
stand-in srun records what it was asked to run and exits with the code under test). A failure the
restarts did not cure requeues the job; config / input errors (2) and non-finite training (3) do
not; a preemption's 75 always does; crash requeues stop at MAX_REQUEUES."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _slurm(tmp_path: Path, rc: int, **env) -> tuple[int, str, str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(
        f'#!/usr/bin/env bash\necho "MAX_RESTARTS=$MAX_RESTARTS $*" >> {tmp_path}/srun.log\nexit {rc}\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\necho 127.0.0.1\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base = {k: v for k, v in base.items() if k not in ("MAX_RESTARTS", "MAX_REQUEUES", "SIGNAL_LEAD_S")}
    full = dict(base, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="777", SLURM_JOB_NUM_NODES="2",
                SLURM_JOB_NODELIST="n[1-2]", SLURM_SUBMIT_DIR=str(ROOT), **env)  # fmt: skip
    r = subprocess.run(
        ["bash", "scripts/slurm_train.sh", "--config", "train_configs/clt_8b.toml"],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    read = lambda name: (tmp_path / name).read_text() if (tmp_path / name).exists() else ""  # noqa: E731
    return r.returncode, r.stdout + r.stderr, read("srun.log"), read("scontrol.log")


@pytest.mark.parametrize("rc", [1, 4, 137, 75])
def test_failures_and_preemption_requeue(tmp_path, rc):
    code, out, srun, scontrol = _slurm(tmp_path, rc)
    assert code == rc, out
    assert "requeue 777" in scontrol, out
    assert "MAX_RESTARTS=3 " in srun  # torchrun restarts in place first
    assert "--checkpoint.signal_lead_s=120 --config train_configs/clt_8b.toml" in srun


@pytest.mark.parametrize("rc", [0, 2, 3])
def test_success_and_errors_a_relaunch_would_repeat_do_not_requeue(tmp_path, rc):
    code, out, _, scontrol = _slurm(tmp_path, rc)
    assert code == rc, out
    assert "requeue" not in scontrol, out
    if rc:
        assert "not requeueing" in out


def test_crash_requeues_are_bounded_but_preemption_is_not(tmp_path):
    code, out, _, scontrol = _slurm(tmp_path, 1, SLURM_RESTART_COUNT="10")
    assert code == 1 and "requeue" not in scontrol and "giving up" in out, out
    code, out, _, scontrol = _slurm(tmp_path, 75, SLURM_RESTART_COUNT="10")
    assert code == 75 and "requeue 777" in scontrol, out


def test_signal_lead_reaches_the_trainer(tmp_path):
    _, out, srun, _ = _slurm(tmp_path, 0, SIGNAL_LEAD_S="300", MAX_RESTARTS="1")
    assert "MAX_RESTARTS=1 " in srun and "--checkpoint.signal_lead_s=300 " in srun, out
