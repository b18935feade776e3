"""Exact resume: 2N steps straight == N steps, stop, N more (same loss at every step, same final
weights, bit for bit on CPU in one process); a run killed by SIGKILL while writing a checkpoint
resumes from the previous complete one and ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slow_commit import ARG as SLOW_COMMIT
from slow_commit import SLEEP_ENV

from torchtitan_clt.checkpoint.manager import list_checkpoints
from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint
from torchtitan_clt.config import load_config
from torchtitan_clt.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
N = 5  # steps before the stop; the runs are 2N steps

COMMON = [
    f"--training.steps={2 * N}", "--training.device=cpu", "--metrics.log_freq=1",
    "--metrics.enable_tensorboard=false", f"--checkpoint.interval={N}", "--checkpoint.keep_latest_k=0",
    "--checkpoint.export=false", "--lr_scheduler.warmup_steps=2",
]  # fmt: skip

SOURCES = {
    "synthetic": [
        "--data.source=synthetic", "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
        "--model.features_per_layer=32", "--training.batch_size=64",
        "--standardize.inputs=per_dim", "--standardize.targets=scalar", "--standardize.estimate_tokens=128",
    ],
    # The tiny random Llama: activations from a real forward through the shuffle buffer. A refill
    # holds 256 rows = 4 steps of 64, so the stop at step 5 falls inside a refill and the resume
    # must replay it.
    "stream": [
        "--data.source=stream", "--data.model_path=tests/assets/tiny_llama", "--data.dataset=shakespeare",
        "--data.seq_len=17", "--data.llm_batch_size=4", "--data.buffer_tokens=256",
        "--model.features_per_layer=32", "--training.batch_size=64",
        "--standardize.inputs=scalar", "--standardize.targets=scalar", "--standardize.estimate_tokens=64",
    ],
}  # fmt: skip


class Stop(Exception):
    pass


def config(folder: Path, name: str, source: str, extra=()):
    return load_config(
        ["--config", str(ROOT / "train_configs/debug_model.toml"), f"--job.dump_folder={folder}",
         f"--job.name={name}", *COMMON, *SOURCES[source], *extra]
    )  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def train_and_stop(cfg, stop_after: int):
    """Run the trainer in this process, as if killed right after the checkpoint of ``stop_after``."""
    trainer = Trainer(cfg)
    save = trainer.checkpointer.save

    def save_then_stop(step, **kw):
        saved = save(step, **kw)
        if step == stop_after:
            raise Stop
        return saved

    trainer.checkpointer.save = save_then_stop
    with pytest.raises(Stop):
        trainer.train()
    trainer.checkpointer.close()
    trainer.metrics.close()
    trainer.source.close()


@pytest.mark.parametrize("source", list(SOURCES))
def test_exact_resume(tmp_path, source):
    cfg = config(tmp_path, "straight", source)
    straight = Trainer(cfg)
    straight.train()
    ref_losses, ref_w = losses(tmp_path / "straight"), weights(straight)
    assert sorted(ref_losses) == list(range(1, 2 * N + 1))

    train_and_stop(config(tmp_path, "resumed", source), N)
    assert list_checkpoints(tmp_path / "resumed/checkpoints")[0] == [N]
    resumed = Trainer(config(tmp_path, "resumed", source))  # same command line: picks up step N
    assert resumed.train_state.step == N
    resumed.train()
    got = losses(tmp_path / "resumed")
    assert got == ref_losses  # every step, exactly
    w = weights(resumed)
    assert w.keys() == ref_w.keys()
    for k in ref_w:
        assert torch.equal(w[k], ref_w[k]), k
    # The saved final step loads offline to the same weights.
    model, meta = load_model_from_checkpoint(tmp_path / "resumed", 2 * N)
    assert meta["step"] == 2 * N
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_w[k]), k


def test_load_step_and_fresh_start(tmp_path):
    cfg = config(tmp_path, "run", "synthetic")
    Trainer(cfg).train()
    assert list_checkpoints(tmp_path / "run/checkpoints")[0] == [N, 2 * N]
    t = Trainer(config(tmp_path, "run", "synthetic", ["--checkpoint.load_step", str(N)]))
    assert t.train_state.step == N
    t.metrics.close()
    check_export_script(tmp_path / "run", t.model)
    t = Trainer(config(tmp_path, "run", "synthetic", ["--checkpoint.enable=false"]))
    assert t.train_state.step == 0
    t.metrics.close()
    t = Trainer(config(tmp_path, "run", "synthetic", ["--checkpoint.fresh_start=true"]))
    assert t.train_state.step == 0
    t.metrics.close()
    assert list_checkpoints(tmp_path / "run/checkpoints")[0] == []


def check_export_script(run: Path, model_at_n) -> None:
    """scripts/export.py on step N of a run: native and circuit-tracer folders, same function."""
    import importlib.util

    import torchtitan_clt

    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts/export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(run), "--step", str(N), "--format", "both"]) == 0
    out = run / f"exports/step-{N}"
    native = torchtitan_clt.load_pretrained(out / "export")
    ct = torchtitan_clt.load_pretrained(out / "circuit_tracer")
    x = torch.randn(16, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model_at_n.eval()(x)
        torch.testing.assert_close(native(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ct(x), want, atol=1e-4, rtol=1e-4)
    assert script.main([str(run), "--step", "3"]) == 2  # no such checkpoint: a message, not a traceback


def test_sigkill_while_saving(tmp_path):
    """Kill -9 the CLI run while step 2N's checkpoint is being written; the same command resumes
    from step N and ends with the weights and losses of an uninterrupted run."""
    args = [
        "--config", "train_configs/debug_model.toml", *COMMON, *SOURCES["synthetic"],
        "--checkpoint.export=false", f"--job.dump_folder={tmp_path}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != SLEEP_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torchtitan_clt.train", *args]
    r = subprocess.run(
        [*cmd, "--job.name=straight"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "killed"
    # The commit of step 2N waits for 120 s (tests/slow_commit.py): the files are written, the
    # checkpoint is not complete. The resume below runs without it.
    proc = subprocess.Popen(
        [*cmd, "--job.name=killed", SLOW_COMMIT], cwd=ROOT, env={**env, SLEEP_ENV: f"120@{2 * N}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not (run / f"checkpoints/step-{2 * N}.tmp/.metadata").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(run / "checkpoints") == ([N], [2 * N])

    r = subprocess.run(
        [*cmd, "--job.name=killed"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"loaded step {N}" in r.stderr + r.stdout
    assert list_checkpoints(run / "checkpoints") == ([N, 2 * N], [])
    assert losses(run) == losses(tmp_path / "straight")
    a, _ = load_model_from_checkpoint(run)
    b, _ = load_model_from_checkpoint(tmp_path / "straight")
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
