"""Mesh groups, the distributed k-th largest and the config check, on 4 gloo processes (one launch).

References are computed independently on every rank from the same seeded data: group members by
hand from the rank layout, thresholds by sorting the concatenated rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives") / "out.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        str(HERE), str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_mesh_groups(results):
    # (dp_replicate, dp_shard, tp) = (1, 2, 2): tp pairs are neighbours, dp pairs stride 2.
    assert results["1x2x2"] == {
        "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
        "dp_rank": [0, 0, 1, 1],
    }
    # (2, 2, 1): the flattened dp group is the whole world, HSDP's replicate pairs stride 2.
    assert results["2x2x1"] == {
        "dp": [[0, 1, 2, 3]] * 4,
        "dp_replicate": [[0, 2], [1, 3], [0, 2], [1, 3]],
        "dp_shard": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "dp_rank": [0, 1, 2, 3],
    }


@pytest.mark.slow
def test_global_kth_largest_matches_sorting_everything(results):
    assert results["kth_errors"] == [], results["kth_errors"]
    assert results["kth_cases"] >= 6


@pytest.mark.slow
def test_config_mismatch_is_reported_on_every_rank(results):
    assert results["config_ok"] is True
    msgs = results["config_mismatch"]
    assert len(msgs) == 4 and all("ranks [3] resolved a different config than rank 0" in m for m in msgs)


# ---------------------------------------------------------------------------------------------
# worker


def _ranks(mesh) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(mesh.get_group())


def _gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from torchtitan_clt.config import ConfigError, JobConfig
    from torchtitan_clt.distributed import ParallelDims, check_config_consistent, init_distributed
    from torchtitan_clt.distributed.collectives import global_kth_largest

    cfg = JobConfig()
    cfg.training.device = "cpu"
    cfg.parallelism.dp_shard, cfg.parallelism.tp = -1, 2
    d = init_distributed(cfg)  # (1, 2, 2)
    res: dict = {}
    res["1x2x2"] = {
        "tp": _gather(_ranks(d.get_mesh("tp"))),
        "dp": _gather(_ranks(d.get_mesh("dp"))),
        "dp_rank": _gather(d.dp_rank),
    }
    d2 = ParallelDims(2, 2, 1, 4)
    d2.build_mesh("cpu")
    res["2x2x1"] = {
        "dp": _gather(_ranks(d2.get_mesh("dp"))),
        "dp_replicate": _gather(_ranks(d2.get_mesh("dp_replicate"))),
        "dp_shard": _gather(_ranks(d2.get_mesh("dp_shard"))),
        "dp_rank": _gather(d2.dp_rank),
    }

    # k-th largest over the 4 ranks' shards of each row, against sorting the whole rows.
    rank, world = dist.get_rank(), dist.get_world_size()
    errors, cases = [], 0
    for seed, (G, n, k) in enumerate(
        [(1, 10, 1), (3, 10, 17), (2, 10, 40), (2, 10, 41), (4, 3, 5), (1, 50, 100)]
    ):
        g = torch.Generator().manual_seed(seed)
        full = torch.randn(G, world * n, generator=g)
        if seed == 4:  # skewed: every large value on one rank
            full = full.sort(dim=1, descending=True).values
        local = full[:, rank * n : (rank + 1) * n]
        got = global_kth_largest(local, k, dist.group.WORLD)
        want = (
            full.sort(dim=1, descending=True).values[:, k - 1]
            if k <= full.shape[1]
            else torch.full((G,), float("-inf"))
        )
        cases += 1
        if not torch.equal(got, want):
            errors.append(f"G={G} n={n} k={k}: {got.tolist()} vs {want.tolist()}")

    # Config agreement: all equal passes; a rank with a different override stops everyone.
    check_config_consistent(cfg)
    res["config_ok"] = True
    if rank == 3:
        cfg.optimizer.lr = 1.0
    try:
        check_config_consistent(cfg)
        msg = "no error"
    except ConfigError as e:
        msg = str(e)
    res["config_mismatch"] = _gather(msg)
    res["kth_errors"] = sum(_gather(errors), [])
    res["kth_cases"] = cases
    if rank == 0:
        Path(out_path).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
