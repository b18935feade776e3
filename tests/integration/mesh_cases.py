"""What the mesh-vs-one-process tests share (test_parallel_model, test_parallel_code,
test_parallel_molt_matryoshka): each launches its own file under torchrun, once per layout, and its
``__main__`` hands its ``_train_case`` to ``worker``, which builds the mesh and trains every case
in turn; rank 0 writes the results as JSON for the test to check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LAYOUTS = {  # name: (nproc, dp_replicate, dp_shard, tp)
    "dp2": (2, 1, 2, 1),
    "tp2": (2, 1, 1, 2),
    "tp4": (4, 1, 1, 4),
    "dp2xtp2": (4, 1, 2, 2),
    "hsdp2x2": (4, 2, 2, 1),
    "rep2xtp2": (4, 2, 1, 2),  # the flagship's way to grow: data-parallel replicas of a tp group
}


def run_layout(
    script: Path, tmp_path: Path, layout: str, cases: list[tuple[str, ...]], timeout: int = 400
) -> list[dict]:
    """One torchrun launch of ``script`` per layout; its workers train every case in turn.
    ``--standalone``: torchrun binds its own free port (no port picked here and freed before it
    is bound, which another process may take meanwhile)."""
    nproc, *_ = LAYOUTS[layout]
    out = tmp_path / f"{layout}.json"
    spec = ",".join(":".join(c) for c in cases)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        str(script), layout, spec, str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text())


def worker(
    layout: str, cases: str, out_path: str, train_case: Callable[..., dict], tp_layout: str = "features"
) -> None:
    """Under torchrun: the layout's mesh, then ``train_case(cfg, dims, *case)`` for every case."""
    import torch.distributed as dist

    from torchtitan_clt.config import JobConfig
    from torchtitan_clt.distributed import init_distributed

    _, R, S, T = LAYOUTS[layout]
    cfg = JobConfig()
    cfg.training.device = "cpu"
    cfg.parallelism.dp_replicate, cfg.parallelism.dp_shard, cfg.parallelism.tp = R, S, T
    cfg.parallelism.tp_layout = tp_layout
    dims = init_distributed(cfg)
    results = [train_case(cfg, dims, *case.split(":")) for case in cases.split(",")]
    if dims.rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


class FixedDead:
    """Stands in for the trainer's DeadFeatureTracker: a fixed dead mask [L, F]."""

    def __init__(self, mask):
        self.mask = mask

    def dead_mask(self):
        return self.mask
