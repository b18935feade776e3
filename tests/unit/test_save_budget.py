"""The checkpoint save-time line against hand-worked numbers (clt_8b: 75.7 B parameters × 12 bytes
= 909 GB, 28.4 GB per rank, 227 GB per node of 8; the issue's 7.6 GB/s for 120 s)."""

from __future__ import annotations

import math

from torchtitan_clt.checkpoint.save_budget import SaveBudget, save_time_line

PER_RANK = 75.7e9 * 12 / 32  # 28.39 GB


def test_clt_8b_at_the_issues_numbers():
    b = SaveBudget(PER_RANK, 8, bandwidth_gbps=1.0, lead_s=120, nodes=4)
    assert math.isclose(b.node_bytes, 227.1e9)
    assert math.isclose(b.save_s, 227.1)  # 227.1 GB / 1 GB/s
    assert not b.fits
    # The issue: 909 GB in 120 s needs >= 7.6 GB/s in all, 1.89 GB/s per node.
    assert math.isclose(b.needed_gbps, 227.1 / 120)
    assert round(b.needed_gbps * 4, 1) == 7.6
    line = b.line()
    assert "908.4 GB in all, 227.1 GB per node (28.39 GB per rank" in line
    assert "does NOT fit the signal's 120 s lead" in line and "WARNING" in line
    assert ">= 1.89 GB/s per node (7.6 GB/s over 4 nodes)" in line
    assert "--signal=B:USR1@313" in line  # 227.1 s × 1.25 + 30


def test_fits_with_the_step_in_progress():
    line = save_time_line(PER_RANK, 8, bandwidth_gbps=2.0, lead_s=120)
    assert "a save takes 114 s: fits the signal's 120 s lead (6 s to spare)" in line
    # A 10 s step finishes before the save starts: 110 s left, not enough.
    assert not SaveBudget(PER_RANK, 8, 2.0, 120, step_s=10).fits
    assert "- a 10 s step" in save_time_line(PER_RANK, 8, 2.0, 120, step_s=10)
    assert SaveBudget(PER_RANK, 8, 2.0, 5, step_s=10).needed_gbps == math.inf
