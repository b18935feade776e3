"""A job of two "nodes" (two launchers joined by a c10d rendezvous on localhost, one worker each)
survives a worker killed with SIGKILL mid-run or mid-save and a worker stopped with SIGSTOP: the
launchers restart every worker by themselves, the run resumes from its last complete checkpoint and
ends with the losses of an uninterrupted run, bit for bit (CPU, gloo); the restart and its cause
are in ``metrics.jsonl``. A config error found by a worker still ends the job at once with exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port
from slow_commit import ARG as SLOW_COMMIT
from slow_commit import SLEEP_ENV

from torchtitan_clt.checkpoint.layout import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
T = 30  # steps; checkpoints every 5
ARGS = [
    "--config", "train_configs/debug_model.toml", f"--training.steps={T}", "--training.device=cpu",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false", "--checkpoint.interval=5",
    "--checkpoint.keep_latest_k=0", "--checkpoint.export=false", "--eval.enable=false",
    "--lr_scheduler.warmup_steps=2", "--data.source=synthetic", "--data.synthetic_n_layers=3",
    "--data.synthetic_d_model=16", "--model.features_per_layer=32", "--training.batch_size=64",
    "--standardize.inputs=per_dim", "--standardize.targets=scalar", "--standardize.estimate_tokens=128",
]  # fmt: skip


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != SLEEP_ENV}
    return dict(env, OMP_NUM_THREADS="1", PYTHON=sys.executable, NGPU="1", **extra)


def _two_nodes(tmp_path: Path, name: str, *extra: str, node1: tuple = (), **env) -> list[subprocess.Popen]:
    """Two launchers (``run_train.sh``) of one worker each, as two nodes of one job; ``node1``:
    arguments for the second node only."""
    port, rdzv = str(free_port()), f"{name}{os.getpid()}"
    args = [*ARGS, f"--job.dump_folder={tmp_path}", f"--job.name={name}", *extra]
    return [
        subprocess.Popen(
            ["./run_train.sh", *args, *(node1 if r else ())],
            cwd=ROOT,
            env=_env(
                NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=rdzv, **env
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> tuple[list[int], str]:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append(out)
    return [p.returncode for p in procs], "\n".join(outs)


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return rows


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}


def _workers(procs: list[subprocess.Popen]) -> dict[int, int]:
    """Global rank -> pid of every worker the launchers run now."""
    out = {}
    for p in procs:
        for task in Path(f"/proc/{p.pid}/task").glob("*"):
            for pid in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:  # gone meanwhile
                    continue
                rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
                if rank is not None:
                    out[rank] = int(pid)
    return out


def _wait_for(cond, procs, timeout=300) -> None:
    deadline = time.time() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, "a launcher ended early:\n" + p.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same job, uninterrupted (two launchers too)."""
    folder = tmp_path_factory.mktemp("restart_ref")
    rcs, out = _finish(_two_nodes(folder, "straight"))
    assert rcs == [0, 0], out[-3000:]
    return folder / "straight"


def _assert_restarted_and_exact(run: Path, reference: Path, out: str, cause: str) -> dict:
    # (the surviving node's worker may print gloo's "Connection closed by peer" traceback)
    assert "ChildFailedError" not in out, out[-4000:]
    assert "restart 1/2 of the workers after" in out, out[-4000:]  # the launcher's console line
    events = [r for r in _rows(run) if r.get("event") == "restart"]
    assert len(events) == 1 and events[0]["restarts"] == 1, events
    assert any(cause in c for c in events[0]["causes"]), events
    assert _losses(run) == _losses(reference)  # every step, bit for bit
    assert sorted(_losses(run)) == list(range(1, T + 1))
    return events[0]


@pytest.mark.slow
def test_kill_9_of_one_node_restarts_and_resumes_exactly(tmp_path, reference):
    run = tmp_path / "killed"
    procs = _two_nodes(tmp_path, "killed", MAX_RESTARTS="2")
    _wait_for(lambda: max(_losses(run), default=0) >= 7, procs)
    victim = _workers(procs[1:])  # the worker of the second node
    ((rank, pid),) = victim.items()
    os.kill(pid, signal.SIGKILL)
    rcs, out = _finish(procs)
    assert rcs == [0, 0], out[-4000:]
    event = _assert_restarted_and_exact(run, reference, out, f"rank {rank} killed by SIGKILL")
    assert event["step"] >= 5  # resumed from a checkpoint, not from scratch
    print("restart:", event)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_resumes_from_the_one_before(tmp_path, reference):
    run = tmp_path / "mid_save"
    # Step 10's commit waits 6 s (tests/slow_commit.py): its files are written, it is not complete.
    procs = _two_nodes(tmp_path, "mid_save", SLOW_COMMIT, MAX_RESTARTS="2", **{SLEEP_ENV: "6@10"})
    _wait_for(lambda: (run / "checkpoints/step-10.tmp/.metadata").exists(), procs)
    os.kill(_workers(procs)[0], signal.SIGKILL)  # rank 0 commits: killed inside the save
    rcs, out = _finish(procs)
    assert rcs == [0, 0], out[-4000:]
    event = _assert_restarted_and_exact(run, reference, out, "rank 0 killed by SIGKILL")
    assert event["step"] == 5  # step 10 was never complete
    assert "step 10 in" in out and "is incomplete (interrupted while saving); skipping it" in out
    done, partial = list_checkpoints(run / "checkpoints")
    assert partial == [] and done[-1] == T


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["training", "training_rank0", "saving"])
def test_sigstop_names_the_rank_and_the_collective_then_restarts(tmp_path, reference, moment):
    """A worker stopped mid-training (rank 1; or rank 0, whose process hosts the store the
    heartbeats go through, so it answers no read), or inside a checkpoint save (step 10's commit
    waits 6 s on rank 0 while the other rank waits for it in the save's last barrier: a long phase,
    where only a rank that stopped answering ends the wait early)."""
    run = tmp_path / "stopped"
    extra = (SLOW_COMMIT,) if moment == "saving" else ()
    env = {SLEEP_ENV: "6@10"} if moment == "saving" else {}
    procs = _two_nodes(
        tmp_path, "stopped", "--parallelism.train_timeout_s=4", *extra, MAX_RESTARTS="2", **env
    )
    if moment == "saving":
        _wait_for(lambda: (run / "checkpoints/step-10.tmp/.metadata").exists(), procs)
        pid = next(p for r, p in _workers(procs).items() if r != 0)  # not the rank that commits
        rank = 1
    else:
        _wait_for(lambda: max(_losses(run), default=0) >= 7, procs)
        rank = 0 if moment == "training_rank0" else 1  # which node's worker it is varies
        pid = _workers(procs)[rank]
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGSTOP)
    _wait_for(lambda: pid not in _workers(procs).values(), procs)  # the launcher killed it
    took = time.perf_counter() - t0
    rcs, out = _finish(procs)
    assert rcs == [0, 0], out[-4000:]
    other = 1 - rank
    assert f"Hang: rank {other} waited" in out, out[-4000:]
    assert f"rank {rank} stopped answering" in out
    assert "past parallelism.train_timeout_s = 4" in out and "called from " in out
    line = next(x for x in out.splitlines() if f"Hang: rank {other} waited" in x)
    event = _assert_restarted_and_exact(run, reference, out, f"rank {other} hung (exit 4)")
    if moment == "saving":
        assert "checkpoint" in line and event["step"] == 10, (line, event)  # step 10 was committed
    print(f"stopped rank {rank}; restarted {took:.1f} s later; {line.split('] ')[-1]}; {event['causes']}")
    assert took < 60  # timeout 4 s + a heartbeat window + the restart


@pytest.mark.slow
def test_config_error_in_a_worker_exits_2_without_restarting(tmp_path):
    t0 = time.perf_counter()
    # Each node's config is valid (run_train.sh's check passes, restarts are on), but they differ:
    # the workers find it (check_config_consistent) and exit 2.
    procs = _two_nodes(tmp_path, "bad", node1=("--optimizer.lr=0.5",), MAX_RESTARTS="3")
    rcs, out = _finish(procs)
    assert rcs == [2, 2], out[-3000:]
    assert out.count("resolved a different config than rank 0") == 2, out[-3000:]  # once per node
    assert "restart" not in out.lower(), out[-3000:]
    print(f"exit 2 after {time.perf_counter() - t0:.1f} s")
