"""Profiler traces on CPU land where the config says, on the steps it says; the snapshot and the
disabled paths are no-ops; the small tools helpers."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from torchtitan_clt.config import ConfigError, JobConfig
from torchtitan_clt.tools.logging import init_logger, logger
from torchtitan_clt.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_clt.tools.utils import device_from_config, peak_memory_gib, set_determinism


def _cfg(**prof) -> JobConfig:
    cfg = JobConfig()
    for k, v in prof.items():
        setattr(cfg.profiling, k, v)
    return cfg


def _loop(prof, start, stop):
    x = torch.randn(16, 16)
    for _ in range(start + 1, stop + 1):
        with torch.profiler.record_function("train_step"):
            (x @ x).relu().sum()
        prof.step()


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")
def test_profiler_writes_chrome_trace_on_cpu(tmp_path):
    cfg = _cfg(enable_profiling=True, profile_freq=3, profile_warmup=1, profile_active=1)
    with maybe_enable_profiling(cfg, tmp_path, global_step=0) as prof:
        assert prof is not None
        _loop(prof, 0, 7)
    # Windows end at steps 3 and 6 (every profile_freq steps); step 7 is not a window end.
    dirs = sorted(p.name for p in (tmp_path / "profile_traces").iterdir())
    assert dirs == ["iteration_3", "iteration_6"]
    trace = tmp_path / "profile_traces" / "iteration_3" / "rank0_trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name") == "train_step" for e in events) == 1  # profile_active = 1 step


def test_profiler_resumed_run_keeps_windows(tmp_path):
    cfg = _cfg(enable_profiling=True, profile_freq=4, profile_warmup=1, profile_active=2)
    with maybe_enable_profiling(cfg, tmp_path, global_step=5) as prof:
        _loop(prof, 5, 9)
    dirs = sorted(p.name for p in (tmp_path / "profile_traces").iterdir())
    assert dirs == ["iteration_8"]


def test_profiling_disabled_and_bad_window(tmp_path):
    with maybe_enable_profiling(_cfg(), tmp_path) as prof:
        assert prof is None
    with maybe_enable_memory_snapshot(_cfg(), tmp_path) as snap:
        assert snap is None
    bad = _cfg(enable_profiling=True, profile_freq=2, profile_warmup=1, profile_active=3)
    with pytest.raises(ConfigError, match="profile_freq"):
        with maybe_enable_profiling(bad, tmp_path):
            pass
    assert not (tmp_path / "profile_traces").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU no-op")
def test_memory_snapshot_is_noop_on_cpu(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="torchtitan_clt"):
        with maybe_enable_memory_snapshot(_cfg(enable_memory_snapshot=True), tmp_path) as snap:
            assert snap is None
    assert any("no CUDA device" in m for m in caplog.messages)
    assert not (tmp_path / "memory_snapshot").exists()


def test_logger_rank_levels(monkeypatch):
    monkeypatch.delenv("TCLT_LOG_RANKS", raising=False)
    monkeypatch.delenv("TCLT_LOG_LEVEL", raising=False)
    try:
        assert init_logger(rank=0).level == logging.INFO
        assert init_logger(rank=3).level == logging.WARNING
        monkeypatch.setenv("TCLT_LOG_RANKS", "all")
        assert init_logger(rank=3).level == logging.INFO
        init_logger(rank=0)
        assert sum(getattr(h, "_tclt", False) for h in logger.handlers) == 1  # idempotent
    finally:
        monkeypatch.delenv("TCLT_LOG_RANKS", raising=False)
        init_logger(rank=0)


def test_utils():
    cfg = JobConfig()
    cfg.training.device = "cpu"
    assert device_from_config(cfg) == torch.device("cpu")
    if not torch.cuda.is_available():
        cfg.training.device = "cuda"
        with pytest.raises(ConfigError, match="training.device"):
            device_from_config(cfg)
    set_determinism(123)
    a = torch.rand(3)
    set_determinism(123)
    assert torch.equal(a, torch.rand(3))
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB live: the peak RSS is at least that
    assert peak_memory_gib("cpu") >= 64 / 1024
    del big
