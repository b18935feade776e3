"""The manager on a gloo process group: FSDP2-sharded model and optimizer saved on 2 ranks load on
1 and on 4 ranks to the same full values; per-rank states are kept apart and refused (or merged)
on another world size."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn

from torchtitan_clt.checkpoint.manager import CheckpointManager, ModelWrapper, OptimizerWrapper, RNGState
from torchtitan_clt.config.job_config import JobConfig
from torchtitan_clt.config.manager import ConfigError


class Global:
    """Identical on every rank (a global data position)."""

    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos, "note": "global"}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]


class PerRank(Global):
    """Differs between ranks; can merge the old ranks' copies."""

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict_from_ranks(self, sds):
        self.pos = sum(sd["pos"] for sd in sds)


def build(world: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def full_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {f"model.{k}": v.clone() for k, v in msd.items()}
    for fqn, st in osd.get("state", {}).items():  # full state lives on rank 0 only
        for k, v in st.items():
            out[f"opt.{fqn}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def cfg_for(async_mode="disabled"):
    cfg = JobConfig()
    cfg.training.steps = 10
    cfg.checkpoint.interval = 2
    cfg.checkpoint.async_mode = async_mode
    return cfg


def worker(rank: int, world: int, port: int, run: str, mode: str, out: str):
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, opt = build(world)
        g, p = Global(), PerRank()
        states = {"model": ModelWrapper(model), "optimizer": OptimizerWrapper(model, opt), "data": g,
                  "per_rank": p, "rng": RNGState()}  # fmt: skip
        mgr = CheckpointManager(run, cfg_for("async" if mode == "save_async" else "disabled"), states)
        if mode.startswith("save"):
            for step in (1, 2):
                x = torch.randn(5, 6, generator=torch.Generator().manual_seed(10 * step + rank))
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                g.pos, p.pos = step, 100 * rank + step
                mgr.save(step)
            mgr.close()  # async: waits for the background write and its commit
        else:
            assert mgr.load() == 2
        full = full_state(model, opt)
        if rank == 0:
            torch.save({"full": full, "data": g.pos, "per_rank": p.pos}, out)
    finally:
        dist.destroy_process_group()


def spawn(world: int, run: Path, mode: str, out: Path):
    mp.start_processes(worker, args=(world, free_port(), str(run), mode, str(out)), nprocs=world,
                       start_method="spawn")  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test")
def test_fsdp_checkpoint_reshards_2_to_1_and_4(tmp_path):
    run = tmp_path / "run"
    spawn(2, run, "save", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt")
    meta = json.loads((run / "checkpoints/step-2/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["shared_keys"] == ["data"]
    assert sorted(meta["per_rank_keys"]) == ["per_rank", "rng"]  # RNG differs: ranks drew different x

    # 4 ranks: FSDP over 4 shards; the merged per-rank state comes from both old ranks.
    spawn(4, run, "load", tmp_path / "on4.pt")
    on4 = torch.load(tmp_path / "on4.pt")
    assert on4["data"] == 2 and on4["per_rank"] == 2 + 102
    assert saved["full"].keys() == on4["full"].keys()
    for k, v in saved["full"].items():
        assert torch.equal(on4["full"][k], v), k

    # 1 process, no process group: plain tensors.
    model, opt = build(1)
    g, p = Global(), PerRank()
    mgr = CheckpointManager(run, cfg_for(), {"model": ModelWrapper(model), "optimizer": OptimizerWrapper(model, opt),
                                             "data": g, "per_rank": p, "rng": RNGState()})  # fmt: skip
    assert mgr.load() == 2
    full = full_state(model, opt)
    for k, v in saved["full"].items():
        assert torch.equal(full[k], v), k
    assert g.pos == 2 and p.pos == 104

    # A per-rank state that cannot merge is refused on another world size.
    class Plain(Global):
        def state_dict(self):
            return {"pos": self.pos}

    mgr = CheckpointManager(run, cfg_for(), {"model": ModelWrapper(model), "per_rank": Plain()})
    with pytest.raises(ConfigError, match="per_rank.*2 ranks"):
        mgr.load()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test")
def test_async_save_on_two_ranks(tmp_path):
    run = tmp_path / "run"
    spawn(2, run, "save_async", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # committed, no .tmp
    model, opt = build(1)
    mgr = CheckpointManager(run, cfg_for(), {"model": ModelWrapper(model), "optimizer": OptimizerWrapper(model, opt),
                                             "data": Global(), "per_rank": PerRank(), "rng": RNGState()})  # fmt: skip
    assert mgr.load() == 2
    for k, v in full_state(model, opt).items():
        assert torch.equal(saved["full"][k], v), k
