"""Resume on a different data-parallel size: a run on 2 gloo ranks (torchrun) checkpointed at
step N resumes on 1 and on 4 ranks; the rows trained on, over both halves, are exactly the rows of
the uninterrupted 2-rank run (none skipped, none twice), and the losses and final weights agree
with it up to fp32 reordering (the gradient average adds in another order): losses within 1e-5
relative, weights within 1e-4 after 2N AdamW steps.

The data is a synthetic source whose position is global (batch n of the whole data-parallel group,
sliced by rank), registered through ``job.custom_import`` from this file; it records the global
ids of the rows each rank trains on when ``TCLT_TEST_RECORD`` names a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

THIS = Path(__file__).resolve()
sys.path.insert(0, str(THIS.parent))  # test_parallel, also when imported by job.custom_import

from test_parallel import ROOT, _Sliced  # noqa: E402

N = 4
BATCH = 32

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(THIS), "--data.source=global_synthetic",
    "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
    "--model.features_per_layer=32", f"--training.steps={2 * N}", f"--training.batch_size={BATCH}",
    "--training.device=cpu", "--optimizer.lr=1e-2", "--lr_scheduler.warmup_steps=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    f"--checkpoint.interval={N}", "--checkpoint.keep_latest_k=0", "--checkpoint.export=false",
]  # fmt: skip


def run(folder: Path, name: str, ngpu: int, record: Path) -> str:
    env = dict(
        os.environ, NGPU=str(ngpu), OMP_NUM_THREADS="1", PYTHON=sys.executable, TCLT_TEST_RECORD=str(record)
    )
    env["MASTER_PORT"] = str(29500 + (os.getpid() + ngpu) % 1000)
    cmd = ["bash", str(ROOT / "run_train.sh"), *BASE, f"--job.dump_folder={folder}", f"--job.name={name}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def rows_seen(record: Path, steps: range) -> Counter:
    seen: Counter = Counter()
    for f in record.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            if e["step"] in steps:
                seen.update(e["rows"])
    return seen


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(run_dir, 2 * N)
    return model.state_dict()


@pytest.mark.slow
def test_resume_from_2_ranks_onto_1_and_4(tmp_path):
    ref_rec = tmp_path / "rec_ref"
    run(tmp_path, "ref", 2, ref_rec)  # uninterrupted, 2 ranks
    ref = tmp_path / "ref"
    ref_losses, ref_w = losses(ref), final_weights(ref)
    assert ref_losses[2 * N] < ref_losses[1]  # it trained
    all_rows = rows_seen(ref_rec, range(1, 2 * N + 1))
    assert len(all_rows) == 2 * N * BATCH and set(all_rows.values()) == {1}

    for ngpu in (1, 4):
        # A run stopped after step N's checkpoint: the reference's folder as it was at step N.
        name = f"resumed_on_{ngpu}"
        dst = tmp_path / name
        (dst / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / f"checkpoints/step-{N}", dst / f"checkpoints/step-{N}")
        kept = [
            line for line in (ref / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= N
        ]
        (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")
        rec = tmp_path / f"rec_{ngpu}"
        out = run(tmp_path, name, ngpu, rec)
        assert f"loaded step {N}" in out
        # Exactly once: the first half's rows (2 ranks) + the second half's (ngpu ranks) = the
        # uninterrupted run's rows, each once.
        assert rows_seen(ref_rec, range(1, N + 1)) + rows_seen(rec, range(N + 1, 2 * N + 1)) == all_rows
        got = losses(dst)
        assert sorted(got) == sorted(ref_losses)
        for step, want in ref_losses.items():
            assert abs(got[step] - want) <= 1e-5 * max(1.0, abs(want)), f"{ngpu} ranks, step {step}"
        w = final_weights(dst)
        for k, v in ref_w.items():
            assert (w[k].float() - v.float()).abs().max().item() <= 1e-4, (ngpu, k)


# ---------------------------------------------------------------------------------------------
# ``job.custom_import`` side: synthetic data with a global position, recording the rows it serves.


def _global_synthetic(job_config, ctx):
    """Batch n of the group is drawn whole (as one rank) and sliced: the position is global."""
    import dataclasses

    from torchtitan_clt.data.synthetic import SyntheticSource

    d = job_config.data
    inner = SyntheticSource(
        d.synthetic_n_layers, d.synthetic_d_model, dataclasses.replace(ctx, dp_rank=0, dp_degree=1)
    )
    return _Recording(inner, ctx.dp_rank, ctx.dp_degree)


class _Recording(_Sliced):
    """Records the global ids of the rows it serves when ``TCLT_TEST_RECORD`` names a folder."""

    def __init__(self, inner, rank: int, degree: int):
        super().__init__(inner, rank, degree)
        rec = os.environ.get("TCLT_TEST_RECORD")
        self.record = Path(rec) / f"rank{rank}_{os.getpid()}.jsonl" if rec else None

    def next_batch(self, batch_size: int):
        n = self.inner.batches  # global batch index (one per micro-step of the whole group)
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            g, lo = batch_size * self.degree, self.rank * batch_size
            with open(self.record, "a") as f:  # one micro-batch per step in this test: step = n + 1
                rows = [n * g + i for i in range(lo, lo + batch_size)]
                f.write(json.dumps({"step": n + 1, "rows": rows}) + "\n")
        return super().next_batch(batch_size)


def _register() -> None:
    from torchtitan_clt.protocols.registry import data_source_registry

    if "global_synthetic" not in data_source_registry.names():
        data_source_registry.register("global_synthetic", _global_synthetic)


if "torchtitan_clt_custom" in __name__:
    _register()
