"""ParallelDims: degree validation, rank layout, single-process behaviour (no process group)."""

import pytest
import torch

from torchtitan_clt.config import ConfigError, JobConfig
from torchtitan_clt.distributed import ParallelDims, init_distributed
from torchtitan_clt.distributed.collectives import global_kth_largest, sum_partials
from torchtitan_clt.distributed.tensor_parallel import placement_for


def test_dp_shard_takes_the_rest():
    d = ParallelDims(dp_replicate=2, dp_shard=-1, tp=2, world_size=16)
    assert (d.dp_replicate, d.dp_shard, d.tp) == (2, 4, 2)
    assert d.dp_degree == 8
    assert d.fsdp_enabled and d.hsdp_enabled and d.tp_enabled and d.dp_shard_enabled


@pytest.mark.parametrize(
    "r,s,t,w,needle",
    [
        (2, -1, 3, 8, "does not divide the world size 8"),
        (1, 2, 2, 8, "(1) × dp_shard (2) × tp (2) = 4, but 8 processes"),
        (1, 1, 0, 1, "parallelism.tp must be at least 1"),
        (0, 1, 1, 1, "parallelism.dp_replicate must be at least 1"),
        (1, 0, 1, 1, "dp_shard must be -1 (the rest) or at least 1"),
    ],
)
def test_bad_degrees_name_the_fix(r, s, t, w, needle):
    with pytest.raises(ConfigError) as e:
        ParallelDims(r, s, t, w)
    assert needle in str(e.value)


def test_rank_layout_tp_innermost():
    d = ParallelDims(2, 2, 2, 8)
    # rank = (r * dp_shard + s) * tp + t, worked by hand for every rank
    expect = {
        0: (0, 0, 0),
        1: (0, 0, 1),
        2: (0, 1, 0),
        3: (0, 1, 1),
        4: (1, 0, 0),
        5: (1, 0, 1),
        6: (1, 1, 0),
        7: (1, 1, 1),
    }
    for rank, coord in expect.items():
        assert d.coordinate(rank) == coord


def test_single_process_has_no_meshes(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = JobConfig()
    cfg.training.device = "cpu"
    d = init_distributed(cfg)
    assert d.world_size == 1 and d.dp_degree == 1 and d.dp_rank == 0
    assert not (d.fsdp_enabled or d.tp_enabled or d.distributed)
    assert d.get_optional_mesh("tp") is None and d.get_optional_mesh("dp") is None
    assert d.get_group("dp") is None
    with pytest.raises(RuntimeError, match="get_optional_mesh"):
        d.get_mesh("tp")
    assert not torch.distributed.is_initialized()


def test_single_process_rejects_a_multi_rank_layout(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = JobConfig()
    cfg.training.device = "cpu"
    cfg.parallelism.tp = 2
    with pytest.raises(ConfigError, match="world size 1"):
        init_distributed(cfg)


def test_kth_largest_single_rank_matches_sort():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    got = global_kth_largest(x, 7, None)
    want = x.sort(dim=1, descending=True).values[:, 6]
    torch.testing.assert_close(got, want)
    assert torch.isneginf(global_kth_largest(x, 51, None)).all()


def test_sum_partials_without_group_is_identity():
    x = torch.randn(4, requires_grad=True)
    assert sum_partials(x, None) is x


def test_tp_plan_lookup_names_missing_params():
    plan = {r"W_dec\.\d+": 0, r"b_dec": None}
    assert placement_for("W_dec.3", plan) == 0
    assert placement_for("b_dec", plan) is None
    with pytest.raises(ValueError, match="no entry for parameter 'W_enc'"):
        placement_for("W_enc", plan)


def _estimate_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "estimate_memory.py"
    spec = importlib.util.spec_from_file_location("estimate_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_estimate_memory_counts_the_real_model_and_its_shards():
    from torchtitan_clt.config import load_config

    est_mod = _estimate_module()
    L, d, F, k = 4, 8, 16, 3
    cfg = load_config(
        [
            "--data.source=synthetic", f"--data.synthetic_n_layers={L}", f"--data.synthetic_d_model={d}",
            f"--model.features_per_layer={F}", "--model.activation=jumprelu", f"--model.k={k}",
            "--parallelism.tp=2", "--parallelism.dp_shard=-1", "--training.batch_size=64",
        ]
    )  # fmt: skip
    est = est_mod.estimate(cfg, 4)  # tp 2 × dp_shard 2
    # W_enc, b_enc, threshold (feature axis), W_dec.s [F, L-s, d] for s < L, W_skip [L, d, d]
    # (skip_connection "auto": on, split on d_in), b_dec [L, d]
    split = L * F * d + L * F + L * F + F * d * L * (L + 1) // 2 + L * d * d
    replicated = L * d
    assert est["n_params"] == split + replicated
    # split params over tp then FSDP; b_dec only over FSDP
    assert est["per_gpu"] == split // 4 + replicated // 2
    assert est["flops"]["skip path fwd"] == 2 * L * d * d
    assert est["rows"]["AdamW m, v (fp32)"] == 8 * est["per_gpu"]
    assert est["flops"]["encoder fwd"] == 2 * L * F * d
    assert est["flops"]["decoder fwd (sparse, k active/layer)"] == 2 * k * d * L * (L + 1) // 2
    assert "total" in est_mod.report(cfg, est)
