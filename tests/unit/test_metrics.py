"""FVU / L0 / dead features against hand-worked values and float64; the metrics logger's files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from torchtitan_clt.config import JobConfig
from torchtitan_clt.metrics import (
    DeadFeatureTracker,
    FVUAccumulator,
    MetricsLogger,
    Throughput,
    format_eta,
    fvu_per_layer,
    fvu_sums,
    l0_per_layer,
)


def _fvu_reference(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Direct float64 definition: per layer Σ‖y − ŷ‖² / Σ‖y − ȳ‖², ȳ the per-dim token mean."""
    y, y_hat = y.double(), y_hat.double()
    out = []
    for layer in range(y.shape[1]):
        yl, hl = y[:, layer], y_hat[:, layer]
        out.append(((yl - hl) ** 2).sum() / ((yl - yl.mean(0, keepdim=True)) ** 2).sum())
    return torch.stack(out)


def test_fvu_hand_worked():
    # One layer, d = 2, three tokens. ȳ = (2, 0); Σ‖y − ȳ‖² = 1+0+1 + 4+0+4 = 10.
    y = torch.tensor([[[1.0, 2.0]], [[2.0, 0.0]], [[3.0, -2.0]]])  # [3, 1, 2]
    y_hat = torch.tensor([[[1.0, 1.0]], [[2.0, 0.0]], [[2.0, -2.0]]])  # errors: 1, 0, 1 -> SSE 2
    assert fvu_per_layer(y, y_hat).tolist() == pytest.approx([0.2])
    # Predicting the mean explains nothing; a perfect prediction everything.
    assert fvu_per_layer(y, torch.tensor([[[2.0, 0.0]]]).expand(3, 1, 2)).item() == pytest.approx(1.0)
    assert fvu_per_layer(y, y).item() == 0.0


def test_fvu_matches_float64_with_offset():
    g = torch.Generator().manual_seed(0)
    # A large mean (as in a residual stream) makes Σy² − (Σy)²/n cancel badly in fp32.
    y = torch.randn(512, 3, 16, generator=g) * torch.tensor([1.0, 0.1, 5.0])[:, None] + 40.0
    y_hat = y + 0.3 * torch.randn(512, 3, 16, generator=g)
    ref = _fvu_reference(y, y_hat)
    got = fvu_per_layer(y, y_hat)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)
    # float64 in -> float64 out, tight.
    torch.testing.assert_close(fvu_per_layer(y.double(), y_hat.double()), ref, rtol=1e-10, atol=0)


def test_fvu_accumulated_equals_concatenated():
    g = torch.Generator().manual_seed(1)
    ys = [torch.randn(n, 2, 8, generator=g, dtype=torch.float64) + i for i, n in enumerate((5, 17, 9))]
    hs = [y + torch.randn(y.shape, generator=g, dtype=torch.float64) * 0.5 for y in ys]
    acc = FVUAccumulator()
    for y, h in zip(ys, hs):
        acc.update(y, h)
    ref = _fvu_reference(torch.cat(ys), torch.cat(hs))
    torch.testing.assert_close(acc.compute(), ref, rtol=1e-12, atol=0)
    # It is not the mean of per-batch FVUs (batches have different means).
    per_batch = torch.stack([_fvu_reference(y, h) for y, h in zip(ys, hs)]).mean(0)
    assert not torch.allclose(per_batch, ref, rtol=1e-3)
    # Sums add.
    s = fvu_sums(ys[0], hs[0]) + fvu_sums(ys[1], hs[1]) + fvu_sums(ys[2], hs[2])
    torch.testing.assert_close(s.fvu(), ref, rtol=1e-12, atol=0)
    acc.reset()
    with pytest.raises(RuntimeError):
        acc.compute()


def test_fvu_constant_target_is_nan_and_shape_errors():
    y = torch.ones(4, 1, 3)
    assert math.isnan(fvu_per_layer(y, y).item())
    with pytest.raises(ValueError, match="same shape"):
        fvu_per_layer(torch.zeros(4, 2, 3), torch.zeros(4, 2, 4))


def test_l0_hand_worked():
    acts = torch.zeros(2, 2, 4)  # [tokens, L, F]
    acts[0, 0, :3] = 1.0  # token 0 layer 0: 3 active
    acts[1, 0, 0] = 0.5  # token 1 layer 0: 1 active
    acts[1, 1, 1] = -2.0  # nonzero counts as active
    assert l0_per_layer(acts).tolist() == [2.0, 0.5]


def test_dead_tracker_by_hand():
    tr = DeadFeatureTracker(n_layers=1, n_features=3, dead_after_tokens=10)
    a = torch.zeros(4, 1, 3)
    a[0, 0, 0] = 1.0  # feature 0 fires in batch 1
    tr.update(a)  # 4 tokens
    assert tr.tokens_since_fire.tolist() == [[0, 4, 4]]
    b = torch.zeros(4, 1, 3)
    b[3, 0, 1] = 2.0  # feature 1 fires in batch 2
    tr.update(b)
    assert tr.tokens_since_fire.tolist() == [[4, 0, 8]]
    tr.update(torch.zeros(2, 1, 3))
    # feature 2: 10 tokens silent -> dead (>= threshold); others alive.
    assert tr.dead_mask().tolist() == [[False, False, True]]
    assert tr.dead_fraction() == pytest.approx(1 / 3)
    tr.update(torch.zeros(1, 1, 3), n_tokens=100)  # explicit token count
    assert tr.tokens_since_fire.tolist() == [[106, 102, 110]]
    assert tr.dead_fraction_per_layer().tolist() == [1.0]
    c = torch.zeros(1, 1, 3)
    c[0, 0, 2] = 0.1  # a dead feature revives
    tr.update(c)
    assert tr.dead_mask().tolist() == [[True, True, False]]


def test_dead_tracker_state_round_trip():
    tr = DeadFeatureTracker(2, 5, dead_after_tokens=7)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        tr.update((torch.rand(3, 2, 5, generator=g) > 0.8).float())
    sd = {k: v.clone() for k, v in tr.state_dict().items()}
    tr2 = DeadFeatureTracker(2, 5, dead_after_tokens=7)
    tr2.load_state_dict(sd)
    assert torch.equal(tr2.dead_mask(), tr.dead_mask())
    x = (torch.rand(3, 2, 5, generator=g) > 0.5).float()
    tr.update(x)
    tr2.update(x)
    assert torch.equal(tr.tokens_since_fire, tr2.tokens_since_fire)
    with pytest.raises(ValueError, match="fresh_start"):
        DeadFeatureTracker(2, 6, 7).load_state_dict(sd)


def test_format_eta_and_throughput():
    assert format_eta(3 * 3600 + 2 * 60 + 5) == "3:02:05"
    assert format_eta(59.6) == "0:01:00"
    assert format_eta(float("nan")) == "?"
    th = Throughput(total_steps=100)
    out = th.update(step=10, tokens=1000)
    assert out["tokens_per_s"] > 0
    # ETA = mean step time × steps left.
    assert out["eta_s"] == pytest.approx(out["step_time_s"] * 90)


def _cfg(tmp_path, **metrics):
    cfg = JobConfig()
    cfg.training.steps = 20
    for k, v in metrics.items():
        setattr(cfg.metrics, k, v)
    return cfg


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    ml = MetricsLogger(tmp_path, cfg, rank=0)
    with caplog.at_level("INFO", logger="torchtitan_clt"):
        for step in (10, 20):
            rec = ml.log(
                step,
                {
                    "tokens": step * 64,
                    "loss": torch.tensor(1.5 / step),
                    "terms": {"recon": torch.tensor(1.0 / step), "sparsity": 0.5 / step},
                    "fvu_per_layer": torch.tensor([0.2, 0.4, float("nan")]),
                    "l0_per_layer": torch.tensor([3.0, 5.0, 1.0]),
                    "dead_frac": 0.25,
                    "lr": 1e-3,
                },
            )
    ml.close()
    assert rec["fvu"] == pytest.approx(0.3)  # mean over finite layers
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    r = json.loads(lines[1])
    assert r["step"] == 20 and r["tokens"] == 1280
    assert r["loss"] == pytest.approx(0.075)
    assert r["loss_recon"] == pytest.approx(0.05) and r["loss_sparsity"] == pytest.approx(0.025)
    assert r["fvu_per_layer"][:2] == pytest.approx([0.2, 0.4]) and r["fvu_per_layer"][2] is None
    assert r["l0"] == pytest.approx(3.0) and r["l0_per_layer"] == pytest.approx([3.0, 5.0, 1.0])
    assert r["dead_frac"] == 0.25 and r["lr"] == 1e-3
    for k in ("tokens_per_s", "eta_s", "peak_mem_gib"):
        assert isinstance(r[k], float) and r[k] >= 0
    assert r["peak_mem_gib"] > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert any("step 20/20" in m and "fvu 0.3000" in m and "eta" in m for m in caplog.messages)

    # A resumed run from step 10 drops the stale step-20 line before appending.
    ml = MetricsLogger(tmp_path, _cfg(tmp_path, enable_tensorboard=False), rank=0, start_step=10)
    ml.log(15, {"tokens": 960, "loss": 0.1})
    ml.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 15]


def test_metrics_logger_other_ranks_and_switches(tmp_path):
    cfg = _cfg(tmp_path)
    ml = MetricsLogger(tmp_path / "r1", cfg, rank=1)
    assert ml.log(1, {"loss": 1.0}) is None
    ml.close()
    assert not (tmp_path / "r1").exists()

    cfg = _cfg(tmp_path, per_layer=False, enable_tensorboard=False)
    ml = MetricsLogger(tmp_path / "r0", cfg, rank=0)
    ml.log(1, {"loss": 1.0, "fvu_per_layer": [0.1, 0.3]})
    ml.close()
    r = json.loads((tmp_path / "r0" / "metrics.jsonl").read_text())
    assert "fvu_per_layer" not in r and r["fvu"] == pytest.approx(0.2)
    assert not (tmp_path / "r0" / "tb").exists()


def _two_rank_worker(rank: int, init_file: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(7)
        ys = [torch.randn(6, 2, 4, generator=g, dtype=torch.float64) + 3 * r for r in range(2)]
        hs = [y + torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
        acc = FVUAccumulator()
        acc.update(ys[rank], hs[rank])
        got = acc.compute(group=dist.group.WORLD)
        torch.testing.assert_close(got, _fvu_reference(torch.cat(ys), torch.cat(hs)), rtol=1e-12, atol=0)

        # Feature 0 fires only on rank 0, feature 1 only on rank 1, feature 2 nowhere.
        tr = DeadFeatureTracker(1, 3, dead_after_tokens=12, group=dist.group.WORLD)
        for step in range(3):
            a = torch.zeros(2, 1, 3)
            if step == 0:
                a[0, 0, rank] = 1.0
            tr.update(a)  # 2 rows here, 4 across the group
        # Counts are group tokens: 8 since features 0/1 fired (on some rank), 12 for feature 2.
        assert tr.dead_mask().tolist() == [[False, False, True]]
        assert tr.tokens_since_fire.tolist() == [[8, 8, 12]]
    finally:
        dist.destroy_process_group()


def test_fvu_and_dead_tracker_reduce_over_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "pg_init"),), nprocs=2, join=True)


def test_metrics_accept_dtensors():
    import os
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        acts = torch.relu(torch.randn(5, 2, 6))
        dacts = distribute_tensor(acts, mesh, [Shard(2)])  # features sharded, as under TP
        torch.testing.assert_close(l0_per_layer(dacts), l0_per_layer(acts))
        tr, tr_ref = DeadFeatureTracker(2, 6, 3), DeadFeatureTracker(2, 6, 3)
        tr.update(dacts)
        tr_ref.update(acts)
        assert torch.equal(tr.tokens_since_fire, tr_ref.tokens_since_fire)
    finally:
        dist.destroy_process_group()
