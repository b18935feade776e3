"""The measured twin's collective counter (``scripts/dry_run.CollectiveCounter``): each call
counted once, by position or keyword, with the ring formulas, on 2 gloo ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank: int, tmp: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    sys.path.insert(0, str(ROOT / "scripts"))
    from dry_run import CollectiveCounter, RSSPhases

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    phases = RSSPhases()
    counter = CollectiveCounter(phases)
    t = torch.ones(100)  # 400 bytes
    with counter.installed(), phases.phase("step"):
        dist.all_reduce(t.clone())  # 2·(W-1)/W·400 = 400
        dist.all_gather_into_tensor(torch.empty(200), t)  # (W-1)·400 = 400, counted once (it calls *_single)
        if hasattr(dist, "reduce_scatter_single"):  # FSDP2's call, by keyword
            dist.reduce_scatter_single(output=torch.empty(50), input=t)  # (W-1)/W·400 = 200
        else:
            dist.reduce_scatter_tensor(output=torch.empty(50), input=t)
        dist.broadcast(t.clone(), src=0)  # 400
        funcol.all_reduce(t, "sum", dist.group.WORLD).wait()  # DTensor's path: 400
    Path(tmp, f"r{rank}.json").write_text(json.dumps({k: dict(v) for k, v in counter.bytes.items()}))
    dist.destroy_process_group()


def test_counts_each_collective_once_by_position_or_keyword(tmp_path):
    import socket

    from helpers import run_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_worker, (str(tmp_path), port), 2, timeout_s=120)
    for r in range(2):
        got = json.loads((tmp_path / f"r{r}.json").read_text())
        assert got == {
            "step": {"all_reduce": 800, "all_gather": 400, "reduce_scatter": 200, "broadcast": 400}
        }, got
