"""The pre-training check that the end of a mesh run can hold what it gathers on rank 0
(``trainer/finish.check_whole_copy_fits``), against hand-counted bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_model
from torchtitan_clt.config.manager import load_config
from torchtitan_clt.errors import ConfigError
from torchtitan_clt.trainer import finish

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    return load_config(
        ["--config", str(ROOT / "train_configs" / "debug_model.toml"), *overrides], check=False
    )


def _check(cfg, model, budget, monkeypatch, world=4):
    monkeypatch.setattr(finish.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(finish, "host_budget_bytes", lambda: budget)
    finish.check_whole_copy_fits(cfg, model, model.args, world)


def test_a_run_that_streams_everything_gathers_nothing():
    m = tiny_model("clt", "batchtopk", L=3, d=8, F=16)
    cfg = _cfg("--eval.enable=false", "--eval.every=0", "--eval.feature_examples_tokens=0",
               "--checkpoint.export=true", "--checkpoint.export_circuit_tracer=true")  # fmt: skip
    assert finish.whole_copy_readers(cfg, m, m.args) == []
    cfg = _cfg("--eval.enable=true", "--eval.feature_examples_tokens=64")
    readers = finish.whole_copy_readers(cfg, m, m.args)
    assert len(readers) == 2 and "evaluation" in readers[0] and "feature pass" in readers[1]
    # On 4 ranks with the circuit-tracer export streamed, the feature pass reads its shares of it.
    cfg = _cfg(
        "--eval.enable=false", "--eval.feature_examples_tokens=64", "--checkpoint.export_circuit_tracer=true"
    )
    assert finish.whole_copy_readers(cfg, m, m.args, world_size=4) == []
    assert "feature pass" in finish.whole_copy_readers(cfg, m, m.args, world_size=3)[0]  # 16 % 3: uneven
    cfg = _cfg(
        "--eval.enable=false", "--eval.feature_examples_tokens=64", "--checkpoint.export_circuit_tracer=false"
    )
    assert "feature pass" in finish.whole_copy_readers(cfg, m, m.args, world_size=4)[0]  # no export to read
    topk = tiny_model("clt", "topk", L=3, d=8, F=16)
    cfg = _cfg("--eval.enable=false", "--checkpoint.export_circuit_tracer=true")
    assert any("TopK" in r for r in finish.whole_copy_readers(cfg, topk, topk.args))


def test_refused_before_training_when_rank_0_cannot_hold_the_copy(monkeypatch):
    m = tiny_model("clt", "batchtopk", L=3, d=8, F=16)
    n = sum(t.numel() for t in (*m.parameters(), *m.buffers()))
    need = 2 * 4 * n  # the fp32 state dict and the model built from it
    cfg = _cfg("--eval.enable=true")
    _check(cfg, m, need, monkeypatch)  # exactly fits
    with pytest.raises(ConfigError, match=r"held-out evaluation.*--eval.enable=false"):
        _check(cfg, m, need - 1, monkeypatch)
    _check(cfg, m, need - 1, monkeypatch, world=1)  # one process: the model is already whole
    off = _cfg("--eval.enable=false", "--eval.every=0", "--eval.feature_examples_tokens=0")
    _check(off, m, 0, monkeypatch)  # nothing reads a whole copy: nothing to hold


def test_the_budget_is_the_node_s_available_memory_over_its_ranks(monkeypatch):
    from pathlib import Path

    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    kib = next(
        int(x.split()[1])
        for x in Path("/proc/meminfo").read_text().splitlines()
        if x.startswith("MemAvailable:")
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    got = finish.host_budget_bytes()
    assert abs(got - kib * 1024 // 4) < 2**30 // 4  # available memory moves a little between reads
    assert got > 0
