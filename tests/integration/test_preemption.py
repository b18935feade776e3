"""SIGTERM / SIGUSR1 (preemption, SLURM's --signal): the run finishes its step, saves that step,
exits with 75, and the same command resumes with the losses of an uninterrupted run (bit for bit
on CPU); a second signal exits at once; the SLURM script forwards the signal and requeues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from slow_commit import ARG as SLOW_COMMIT
from slow_commit import SLEEP_ENV

from torchtitan_clt.checkpoint.manager import list_checkpoints
from torchtitan_clt.tools.signals import DEBOUNCE_S

ROOT = Path(__file__).resolve().parents[2]
T = 40  # steps of a run; the signal comes after step 5
ARGS = [
    "--config", "train_configs/debug_model.toml", f"--training.steps={T}", "--training.device=cpu",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false", "--checkpoint.interval=1000",
    "--checkpoint.keep_latest_k=0", "--checkpoint.export=false", "--eval.enable=false",
    "--lr_scheduler.warmup_steps=2", "--data.source=synthetic", "--data.synthetic_n_layers=3",
    "--data.synthetic_d_model=16", "--model.features_per_layer=32", "--training.batch_size=64",
    "--standardize.inputs=per_dim", "--standardize.targets=scalar", "--standardize.estimate_tokens=128",
]  # fmt: skip


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != SLEEP_ENV}
    return dict(env, OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)


def _start(cmd, tmp_path, name, *extra, **env):
    return subprocess.Popen(
        [*cmd, *ARGS, f"--job.dump_folder={tmp_path}", f"--job.name={name}", *extra],
        cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    if not (run / "metrics.jsonl").is_file():
        return {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for(cond, proc, timeout=300):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended before it was signalled:\n" + proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)


LAUNCH = ["./run_train.sh"]
PLAIN = [sys.executable, "-m", "torchtitan_clt.train"]


def test_sigterm_saves_the_step_reached_and_resumes_exactly(tmp_path):
    ref = _start(LAUNCH, tmp_path, "straight")  # runs alongside the interrupted one
    run = tmp_path / "stopped"
    proc = _start(LAUNCH, tmp_path, "stopped")
    _wait_for(lambda: max(_losses(run), default=0) >= 5, proc)
    seen = max(_losses(run))
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)  # to the launcher (run_train.sh execs it), which forwards it
    out, _ = proc.communicate(timeout=300)
    exit_s = time.perf_counter() - t0
    assert proc.returncode == 75, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    stopped = max(_losses(run))
    assert seen <= stopped <= seen + 2 < T  # the step in progress (logged rows may lag by one)
    assert f"Stopped by SIGTERM at step {stopped}/{T}: checkpoint of step {stopped} written" in out
    assert list_checkpoints(run / "checkpoints") == ([stopped], [])
    print(f"signal after step {seen}, saved step {stopped}, launcher exited {exit_s:.1f} s after the signal")
    assert exit_s < 30  # ~1 s on an idle machine: a step, the save, the worker's and torchrun's exit

    r = subprocess.run(
        [*LAUNCH, *ARGS, f"--job.dump_folder={tmp_path}", "--job.name=stopped"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"loaded step {stopped}" in r.stdout + r.stderr
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    assert _losses(run) == _losses(tmp_path / "straight")  # every step, bit for bit


def test_second_signal_exits_at_once_without_saving(tmp_path):
    run = tmp_path / "twice"
    # Step 5 saves; the commit of step 10 sleeps for a minute (tests/slow_commit.py), and both
    # signals land inside it.
    proc = _start(PLAIN, tmp_path, "twice", "--checkpoint.interval=5", SLOW_COMMIT, **{SLEEP_ENV: "60@10"})
    _wait_for(lambda: (run / "checkpoints/step-10.tmp/.metadata").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(DEBOUNCE_S + 0.5)  # a repeat within DEBOUNCE_S counts as the same request
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert time.perf_counter() - t0 < 20  # not the minute the commit would still sleep
    assert "Received SIGTERM again: exiting now without saving" in out
    assert list_checkpoints(run / "checkpoints") == ([5], [10])  # step 5 intact, 10 never completed


def test_slurm_script_forwards_usr1_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: one local task that gets the signals srun gets, as SLURM's srun forwards them.
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        'SLURM_NODEID=0 "$@" & pid=$!\n'
        "trap 'kill -USR1 $pid' USR1; trap 'kill -TERM $pid' TERM\n"
        "while true; do wait $pid && rc=0 || rc=$?; kill -0 $pid 2>/dev/null || break; done; exit $rc\n"
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\necho 127.0.0.1\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "fake1", "SLURM_SUBMIT_DIR": str(ROOT), "NGPU": "1"}  # fmt: skip
    run = tmp_path / "slurm"
    proc = _start(["bash", "scripts/slurm_train.sh"], tmp_path, "slurm", **env)
    _wait_for(lambda: max(_losses(run), default=0) >= 5, proc)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch script
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    stopped = max(_losses(run))
    assert f"Stopped by SIGUSR1 at step {stopped}/{T}" in out
    assert list_checkpoints(run / "checkpoints") == ([stopped], [])
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()
