"""The SAE, MOLT and Matryoshka CLT families train on a gloo mesh exactly like one process.

Each family runs 12 steps through ``run_train.sh`` on 1 process and on 2 (dp_shard=2, then tp=2;
the SAE with PLT's tensor-parallel plan) over the same global batches (the dp-sliced synthetic
source of ``test_parallel.py``; the SAE reads and writes one hook, so its variant serves ``x`` as
the target). Losses must agree within 1e-5 relative at every step and the exported weights within
1e-4: a missing gradient average is off by O(1e-1). Every family also trains on tp=2 (the
``features`` layout; MOLT and Matryoshka in detail: test_parallel_molt_matryoshka.py); MOLT and
Matryoshka have no ``code`` layout: asked for it, tp=2 must stop with the message naming the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THIS = Path(__file__).resolve()
sys.path.insert(0, str(THIS.parent))  # test_parallel, also when imported by job.custom_import

from test_parallel import ROOT, _Sliced, assert_same_training, losses, run_training  # noqa: E402

STEPS = 12

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(THIS),
    "--data.synthetic_n_layers=2", "--data.synthetic_d_model=16",
    "--model.features_per_layer=32",
    f"--training.steps={STEPS}", "--training.batch_size=32", "--training.device=cpu",
    "--optimizer.lr=2e-2", "--lr_scheduler.warmup_steps=0", "--lr_scheduler.decay_ratio=0",
    "--loss.lambda_warmup_steps=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.enable=false", "--checkpoint.export=true",
    # the end-of-run BatchTopK threshold fit reads rank 0's rows, which differ between layouts
    "--checkpoint.export_calibration_tokens=0",
]  # fmt: skip

FAMILIES = {
    "sae": ["--model.name=sae", "--model.activation=topk", "--model.k=4", "--data.source=sliced_sae"],
    "molt": [
        "--model.name=molt", "--model.activation=jumprelu", "--model.molt_ranks=[4,2]",
        "--model.molt_counts=[8,24]", "--model.jumprelu_threshold_init=0.05",
        "--loss.lambda_sparsity=3e-3", "--data.source=sliced_tc",
    ],
    "matryoshka_clt": [
        "--model.name=matryoshka_clt", "--model.activation=batchtopk", "--model.k=4",
        "--model.matryoshka_prefixes=[8,32]", "--loss.sparsity=none", "--data.source=sliced_tc",
    ],
}  # fmt: skip
DP2 = ["--parallelism.dp_shard=2", "--parallelism.tp=1"]
TP2 = ["--parallelism.dp_shard=1", "--parallelism.tp=2"]


def same_training(run: Path, ref: Path) -> None:
    want = losses(ref)
    assert sum(want[-3:]) < 0.97 * sum(want[:3])  # the reference trained
    assert_same_training(run, ref, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_dp2_and_tp2_match_one_process(tmp_path, family):
    ref = run_training(tmp_path, f"ref_{family}", 1, BASE + FAMILIES[family])
    same_training(run_training(tmp_path, f"dp2_{family}", 2, BASE + FAMILIES[family] + DP2), ref)
    same_training(run_training(tmp_path, f"tp2_{family}", 2, BASE + FAMILIES[family] + TP2), ref)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["molt", "matryoshka_clt"])
def test_family_without_code_plan_refuses_code_layout(tmp_path, family):
    env = dict(os.environ, NGPU="2", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    cmd = [
        "bash",
        str(ROOT / "run_train.sh"),
        f"--job.dump_folder={tmp_path}",
        *BASE,
        *FAMILIES[family],
        *TP2,
        "--parallelism.tp_layout=code",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert 'set parallelism.tp_layout = "features"' in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# ``job.custom_import`` side: the global synthetic batch, sliced by data-parallel rank.


def _register() -> None:
    from torchtitan_clt.protocols.registry import data_source_registry

    def build(job_config, ctx, sae: bool):
        import dataclasses

        from torchtitan_clt.data.synthetic import SyntheticSource

        d = job_config.data
        inner = SyntheticSource(
            d.synthetic_n_layers, d.synthetic_d_model, dataclasses.replace(ctx, dp_rank=0, dp_degree=1)
        )
        return (_SAESliced if sae else _Sliced)(inner, ctx.dp_rank, ctx.dp_degree)

    for name, sae in (("sliced_tc", False), ("sliced_sae", True)):
        if name not in data_source_registry.names():
            data_source_registry.register(name, lambda cfg, ctx, sae=sae: build(cfg, ctx, sae))


class _SAESliced(_Sliced):
    """Reads and writes one hook: the target is the input."""

    def __init__(self, inner, rank, degree):
        super().__init__(inner, rank, degree)
        self.hook_in = self.hook_out = "resid_post"

    def next_batch(self, batch_size: int):
        x, _ = super().next_batch(batch_size)
        return x, x

    def describe(self):
        return {**self.inner.describe(), "hook_in": "resid_post", "hook_out": "resid_post"}


if "torchtitan_clt_custom" in __name__:
    _register()
