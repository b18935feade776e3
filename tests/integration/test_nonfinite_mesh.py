"""``training.nonfinite_check = "deferred"`` on a gloo mesh: a NaN on one rank skips the update on
every rank (the verdict is summed over the mesh before the fused optimizer reads it), and every
rank stops at the same step with the same error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

THIS = Path(__file__).resolve()
ROOT = THIS.parents[2]
CUSTOM = str(THIS.with_name("custom_family.py"))


def _worker(rank: int, world: int, tmp: str, layout: list[str], port: int) -> None:
    import torch
    from helpers import as_torchrun_rank

    from torchtitan_clt.config import load_config
    from torchtitan_clt.distributed.utils import destroy
    from torchtitan_clt.train import Trainer, TrainingError

    as_torchrun_rank(rank, world, port)
    args = [
        "--config", str(ROOT / "train_configs/debug_model.toml"), f"--job.dump_folder={tmp}",
        f"--job.custom_import={CUSTOM}", "--data.source=toy_nan_rank1", "--training.device=cpu",
        "--standardize.inputs=none", "--standardize.targets=none", "--training.steps=10",
        "--checkpoint.enable=false", "--checkpoint.export=false", "--eval.enable=false",
        "--metrics.log_freq=100", "--metrics.enable_tensorboard=false", "--optimizer.fused=true",
        "--training.nonfinite_check=deferred", *layout,
    ]  # fmt: skip
    trainer = Trainer(load_config(args))
    report: dict = {"guard": trainer.step_fn.guard is not None}
    try:
        trainer.train()
    except TrainingError as e:
        report["error"] = str(e)
    report["step"] = trainer.train_state.step
    report["adam_steps"] = sorted({float(st["step"]) for o in trainer.optimizers for st in o.state.values()})
    report["finite"] = all(bool(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all())
                           for p in trainer.model.parameters())  # fmt: skip
    trainer.metrics.close()
    Path(tmp, f"report{rank}.json").write_text(json.dumps(report))
    destroy()


@pytest.mark.parametrize(
    "layout",
    [["--parallelism.dp_shard=2", "--parallelism.tp=1"], ["--parallelism.dp_shard=1", "--parallelism.tp=2"]],
    ids=["dp2", "tp2"],
)
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, layout):
    from helpers import free_port, run_ranks

    port = free_port()
    run_ranks(_worker, (2, str(tmp_path), layout, port), 2, timeout_s=300)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep["guard"], rep
        # Rank 1 read NaN targets at step 4; rank 0's were finite, and it stops with it.
        assert "at step 4" in rep.get("error", ""), (r, rep)
        assert "training stopped at step 6" in rep["error"], (r, rep)
        assert rep["step"] == 6, (r, rep)
        assert rep["adam_steps"] == [3.0], (r, rep)  # steps 4 and 5 skipped on the device
        assert rep["finite"], (r, rep)
    assert "targets (mlp_out) at layers 0, 1" in reports[1]["error"]
