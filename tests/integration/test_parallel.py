"""The trainer on a gloo mesh trains exactly like one process (the issue's acceptance test).

A CLT with JumpReLU and one with BatchTopK across layers are trained for 20 steps by
``run_train.sh`` (torchrun) with 1 process, 2 (dp), 2 (tp) and 4 (dp_shard 2 × tp 2) processes on
the same global batches. The logged loss of every step and the exported final weights must agree.

Tolerance, from fp32 reordering only (tp partial sums and the dp gradient average add in another
order than one process; measured differences are ~1e-7): losses within 1e-5 relative, final
weights within 1e-4 absolute after 20 AdamW steps. A missing, doubled or misplaced reduction is off
by O(1e-1) or more from the first steps on.

The data is the ``synthetic`` source drawn as one global batch per step and sliced by data-parallel
rank (``dp_sliced_synthetic`` below, registered through ``job.custom_import``), so every layout
sees the same rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
STEPS = 20

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(THIS),
    "--data.source=dp_sliced_synthetic",
    "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
    "--model.name=clt", "--model.features_per_layer=32", "--model.k=4",
    "--model.jumprelu_threshold_init=0.05", "--model.jumprelu_bandwidth=0.5",
    f"--training.steps={STEPS}", "--training.batch_size=32", "--training.device=cpu",
    "--optimizer.lr=2e-2", "--lr_scheduler.warmup_steps=0", "--lr_scheduler.decay_ratio=0",
    "--loss.lambda_sparsity=3e-3", "--loss.lambda_warmup_steps=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.enable=false", "--checkpoint.export=true",
]  # fmt: skip

ACTIVATIONS = {
    "jumprelu": ["--model.activation=jumprelu"],
    "batchtopk_all": ["--model.activation=batchtopk", "--model.batchtopk_scope=all", "--loss.sparsity=none"],
}

LAYOUTS = {  # name: (NGPU, overrides)
    "dp2": (2, ["--parallelism.dp_shard=2", "--parallelism.tp=1"]),
    "tp2": (2, ["--parallelism.dp_shard=1", "--parallelism.tp=2"]),
    "dp2_tp2": (4, ["--parallelism.dp_shard=2", "--parallelism.tp=2"]),
}


def run_training(folder: Path, name: str, ngpu: int, overrides: list[str], env_extra=None) -> Path:
    env = dict(os.environ, NGPU=str(ngpu), OMP_NUM_THREADS="1", PYTHON=sys.executable, **(env_extra or {}))
    cmd = [
        "bash",
        str(ROOT / "run_train.sh"),
        f"--job.dump_folder={folder}",
        f"--job.name={name}",
        *overrides,
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return folder / name


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


def assert_same_training(run: Path, ref: Path, steps: int = STEPS) -> None:
    got, want = losses(run), losses(ref)
    assert len(got) == len(want) == steps
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: loss {a} vs one process {b}"
    w, w_ref = weights(run), weights(ref)
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        diff = (w[k].float() - w_ref[k].float()).abs().max().item()
        assert diff <= 1e-4, f"{k}: max |Δ| {diff} after {STEPS} steps"


def reference_run(tmp_path_factory, activation: str) -> Path:
    """The one-process run, made once per pytest session (test_multinode.py reuses it)."""
    folder = tmp_path_factory.getbasetemp() / "parallel_references"
    run = folder / f"ref_{activation}"
    if not (run / "export" / "model.safetensors").is_file():
        folder.mkdir(exist_ok=True)
        run_training(folder, f"ref_{activation}", 1, BASE + ACTIVATIONS[activation])
    return run


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return {act: reference_run(tmp_path_factory, act) for act in ACTIVATIONS}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_layout_matches_one_process(tmp_path, references, layout, activation):
    ngpu, mesh = LAYOUTS[layout]
    run = run_training(tmp_path, f"{layout}_{activation}", ngpu, BASE + ACTIVATIONS[activation] + mesh)
    ref = references[activation]
    # The reference itself must have trained, or equal losses would prove nothing.
    ref_losses = losses(ref)
    assert sum(ref_losses[-5:]) < 0.97 * sum(ref_losses[:5])
    assert_same_training(run, ref)


# ---------------------------------------------------------------------------------------------
# ``job.custom_import`` side: a synthetic source whose global batch does not depend on dp degree.


def _register_source() -> None:
    from torchtitan_clt.protocols.registry import data_source_registry

    if "dp_sliced_synthetic" in data_source_registry.names():
        return

    def build(job_config, ctx):
        import dataclasses

        from torchtitan_clt.data.synthetic import SyntheticSource

        d = job_config.data
        # Every rank draws the global stream (as data-parallel rank 0 of 1) and keeps its rows.
        inner = SyntheticSource(
            d.synthetic_n_layers, d.synthetic_d_model, dataclasses.replace(ctx, dp_rank=0, dp_degree=1)
        )
        return _Sliced(inner, ctx.dp_rank, ctx.dp_degree)

    data_source_registry.register("dp_sliced_synthetic", build)


class _Sliced:
    def __init__(self, inner, rank: int, degree: int):
        self.inner, self.rank, self.degree = inner, rank, degree
        for k in ("n_layers", "d_in", "d_out", "layers", "model_name", "hook_in", "hook_out"):
            setattr(self, k, getattr(inner, k))

    def next_batch(self, batch_size: int):
        x, y = self.inner.next_batch(batch_size * self.degree)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[rows], y[rows]

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)

    def close(self):
        self.inner.close()

    def describe(self):
        return self.inner.describe()


if __name__ != "__main__" and not __name__.startswith("test_") and "torchtitan_clt_custom" in __name__:
    _register_source()
