"""scripts/gpu_trainer_check.py (what gpu_check.sh runs on a GPU) works here at toy sizes: the
trainer runs, its numbers come back, and the FLOPs per token behind the MFU are the hand count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_trainer_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_trainer_check.py"), "--device", "cpu", "--tiny",
           "--steps", "4", "--cases", "jumprelu_NL_past_65535", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())["cases"]["jumprelu_NL_past_65535"]
    assert res["ok"] and res["tokens_per_s"] > 0 and res["loss_last"] < res["loss_first"], res
    L, d, F, k = 4, 32, 256, 32  # the tiny case; k is the config's default (the sparse decoder's count)
    enc, skip, dec = 2 * L * F * d, 2 * L * d * d, 2 * k * d * L * (L + 1) // 2
    assert res["flops_per_token"] == 2 * (enc + skip) + 3 * dec
