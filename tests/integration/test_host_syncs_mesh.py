"""Host reads of device values in one non-logging Trainer step on a gloo mesh (``helpers.count_host_syncs``
in every rank), as ``tests/unit/test_host_syncs.py`` counts them in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

THIS = Path(__file__).resolve()
ROOT = THIS.parents[2]
TESTS = str(ROOT / "tests")


def _worker(rank: int, world: int, tmp: str, overrides: list[str], port: int) -> None:
    import sys

    sys.path.insert(0, TESTS)
    from helpers import as_torchrun_rank, count_host_syncs

    from torchtitan_clt.config import load_config
    from torchtitan_clt.distributed.utils import destroy
    from torchtitan_clt.train import Trainer

    as_torchrun_rank(rank, world, port)
    args = [
        "--config", str(ROOT / "train_configs/debug_model.toml"), f"--job.dump_folder={tmp}",
        "--training.device=cpu", "--data.source=synthetic", "--data.synthetic_n_layers=3",
        "--data.synthetic_d_model=16", "--model.features_per_layer=128", "--model.k=4",
        "--training.batch_size=64", "--training.steps=5", "--metrics.log_freq=100",
        "--checkpoint.enable=false", "--checkpoint.export=false", "--eval.enable=false",
        "--metrics.enable_tensorboard=false", "--optimizer.fused=true",
        "--training.nonfinite_check=deferred", *overrides,
    ]  # fmt: skip
    trainer = Trainer(load_config(args))
    trainer.train_step(1, collect=True)
    trainer.train_step(2)
    with count_host_syncs() as n:
        trainer.train_step(3)
    trainer.metrics.close()
    Path(tmp, f"syncs{rank}.json").write_text(json.dumps(n.calls))
    destroy()


CASES = {
    # name: (overrides, host reads per rank in one step today)
    "topk_dp2": (["--model.activation=topk", "--parallelism.dp_shard=2", "--parallelism.tp=1"], 0),
    # TopK over tp: each rank keeps its share of a row's k, so the exact-k repack sizes its rows
    # from the batch (``kernels/selection._repack``: two reads) and the layout compacts (two more)
    "topk_tp2": (["--model.activation=topk", "--parallelism.dp_shard=1", "--parallelism.tp=2"], 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_host_reads_in_one_step_on_a_mesh(tmp_path, case):
    from helpers import free_port, run_ranks

    overrides, expected = CASES[case]
    port = free_port()
    run_ranks(_worker, (2, str(tmp_path), overrides, port), 2, timeout_s=300)
    calls = [json.loads((tmp_path / f"syncs{r}.json").read_text()) for r in range(2)]
    assert calls[0] == calls[1], calls
    assert sum(calls[0].values()) == expected, calls
