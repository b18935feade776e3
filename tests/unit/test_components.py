"""LR schedule values by hand, optimizer container state round trip, gradient clipping."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
from helpers import free_port

from torchtitan_clt.components import (
    build_lr_scheduler,
    build_optimizer,
    clip_grad_norm_,
    warmup_stable_decay,
)
from torchtitan_clt.config import ConfigError, JobConfig


def _cfg(steps=10, **sched) -> JobConfig:
    cfg = JobConfig()
    cfg.training.steps = steps
    cfg.optimizer.lr = 1.0
    for k, v in sched.items():
        setattr(cfg.lr_scheduler, k, v)
    return cfg


def _lrs(cfg, n=None):
    """The lr used by each optimizer step t = 1..n."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, cfg.training.steps)
    out = []
    for _ in range(n or cfg.training.steps):
        out.append(sched.get_last_lr())
        opt.step()
        sched.step()
    return out


def test_schedule_warmup_stable_linear_decay_by_hand():
    # 10 steps, warmup 4 from 0.2, decay over the last 4 (0.4·10) linearly to 0.1.
    cfg = _cfg(10, warmup_steps=4, warmup_start_factor=0.2, decay_ratio=0.4, min_lr_factor=0.1)
    expected = [0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]
    assert _lrs(cfg) == pytest.approx(expected)
    # After the last step the factor stays at the last one.
    assert _lrs(cfg, 12)[-2:] == pytest.approx([0.1, 0.1])


def test_schedule_cosine_and_constant_by_hand():
    cfg = _cfg(8, warmup_steps=0, decay_type="cosine", decay_ratio=0.5, min_lr_factor=0.0)
    # Decay steps t = 5..8, p = 1/4..1, factor = (1 + cos πp)/2.
    cos = [(1 + math.cos(math.pi * p)) / 2 for p in (0.25, 0.5, 0.75, 1.0)]
    assert _lrs(cfg) == pytest.approx([1.0] * 4 + cos)
    assert cos[1] == pytest.approx(0.5)
    cfg = _cfg(5, warmup_steps=2, decay_type="constant", decay_ratio=0.5, min_lr_factor=0.3)
    assert _lrs(cfg) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_schedule_full_decay_and_overlap():
    # decay_ratio 1: decays throughout, reaching min at the last step.
    f = [warmup_stable_decay(s, 4, 0, 4, decay_type="linear", min_lr_factor=0.0) for s in range(4)]
    assert f == pytest.approx([0.75, 0.5, 0.25, 0.0])
    # Warmup 3 + decay 5 > 6 steps: the decay is shortened to the 3 steps after warmup.
    cfg = _cfg(6, warmup_steps=3, decay_ratio=5 / 6)
    assert _lrs(cfg) == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3, 0.0])
    with pytest.raises(ConfigError, match="decay_ratio"):
        build_lr_scheduler(
            build_optimizer(nn.Linear(1, 1), _cfg(5, decay_ratio=1.5).optimizer),
            _cfg(5, decay_ratio=1.5).lr_scheduler,
            5,
        )


def _train(model, opt, sched, xs):
    losses = []
    for x in xs:
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,fused", [("adamw", "auto"), ("adam", "false")])
def test_optimizer_and_scheduler_state_round_trip(name, fused):
    cfg = _cfg(10, warmup_steps=3, decay_ratio=0.5)
    cfg.optimizer.lr, cfg.optimizer.name, cfg.optimizer.fused = 1e-2, name, fused
    cfg.optimizer.weight_decay = 0.01
    torch.manual_seed(0)
    xs = [torch.randn(8, 4) for _ in range(8)]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, cfg.training.steps)
    if fused == "auto":
        assert opt.optimizers[0].defaults["fused"]  # fused AdamW exists on CPU in torch >= 2.4
    _train(model, opt, sched, xs[:4])

    # Snapshot, then continue: the reference.
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    opt_sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt_sd.items()}
    sched_sd = sched.state_dict()
    assert any(k.startswith("state.") and k.endswith("exp_avg") for k in opt_sd)
    ref = _train(model, opt, sched, xs[4:])
    ref_w = [p.detach().clone() for p in model.parameters()]

    # A fresh model/optimizer/scheduler loaded from the snapshot takes the identical next steps.
    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model2.load_state_dict(model_sd)
    opt2 = build_optimizer(model2, cfg.optimizer)
    sched2 = build_lr_scheduler(opt2, cfg.lr_scheduler, cfg.training.steps)
    opt2.load_state_dict(opt_sd)
    sched2.load_state_dict(sched_sd)
    assert sched2.get_last_lr() == pytest.approx(1e-2 * warmup_stable_decay(4, 10, 3, 5))
    got = _train(model2, opt2, sched2, xs[4:])
    assert got == ref
    for a, b in zip(ref_w, model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_optimizer_state_through_dcp(tmp_path):
    """The containers are Stateful: DCP saves and loads them in place (no process group)."""
    import torch.distributed.checkpoint as dcp

    cfg = _cfg(6, warmup_steps=2)
    cfg.optimizer.lr = 1e-2
    torch.manual_seed(0)
    xs = [torch.randn(4, 3) for _ in range(4)]
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, cfg.training.steps)
    _train(model, opt, sched, xs[:2])
    dcp.save({"model": model.state_dict(), "optim": opt, "lr": sched}, checkpoint_id=str(tmp_path))
    ref = _train(model, opt, sched, xs[2:])

    model2 = nn.Linear(3, 2)
    opt2 = build_optimizer(model2, cfg.optimizer)
    sched2 = build_lr_scheduler(opt2, cfg.lr_scheduler, cfg.training.steps)
    msd = model2.state_dict()
    dcp.load({"model": msd, "optim": opt2, "lr": sched2}, checkpoint_id=str(tmp_path))
    model2.load_state_dict(msd)
    assert sched2.last_step == 2
    assert _train(model2, opt2, sched2, xs[2:]) == ref


def test_clip_grad_norm_plain():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    total = clip_grad_norm_([a, b], max_norm=1.0)
    assert total.item() == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0, 0], abs=1e-6)
    assert b.grad.tolist() == pytest.approx([0, 0.8], abs=1e-6)
    # Below the max: untouched; max_norm 0 only measures.
    assert clip_grad_norm_([a, b], max_norm=10.0).item() == pytest.approx(1.0, abs=1e-5)
    assert b.grad.tolist() == pytest.approx([0, 0.8], abs=1e-6)
    assert clip_grad_norm_([a, b], 0.0, norm_type=float("inf")).item() == pytest.approx(0.8)


def test_dtensor_params_clip_and_fused_step():
    """One-process gloo mesh: DTensor params (Shard) next to a plain one; the clip norm is the
    full norm and fused AdamW steps like on plain tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        w = torch.randn(4, 3)
        model = nn.Module()
        model.w = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        model.b = nn.Parameter(torch.zeros(3))
        ref = nn.Module()
        ref.w, ref.b = nn.Parameter(w.clone()), nn.Parameter(torch.zeros(3))
        cfg = _cfg(5)
        cfg.optimizer.lr = 0.1
        opts = [build_optimizer(m, cfg.optimizer) for m in (model, ref)]
        for m, opt in zip((model, ref), opts):
            g = torch.arange(12.0).reshape(4, 3)
            m.w.grad = distribute_tensor(g, mesh, [Shard(0)]) if m is model else g
            m.b.grad = torch.ones(3)
            total = clip_grad_norm_(m.parameters(), max_norm=1.0)
            full = math.sqrt(sum(i * i for i in range(12)) + 3)
            assert total.item() == pytest.approx(full, rel=1e-6)
            opt.step()
        torch.testing.assert_close(model.w.full_tensor(), ref.w.detach())
        torch.testing.assert_close(model.b.detach(), ref.b.detach())
        sd = opts[0].state_dict()
        assert "state.w.exp_avg" in sd and "state.b.exp_avg" in sd
        opts[0].load_state_dict(sd)  # DTensor and plain parameters sit in separate groups
    finally:
        dist.destroy_process_group()
