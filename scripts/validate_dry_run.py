"""The traced dry run against its measured twin on this CPU: one config run for real on a gloo mesh
(``scripts/dry_run.py --measure`` under torchrun) and traced on fake tensors as the same rank, per
phase: the peak RSS of each, their ratio, and the bytes each collective sent.

    .venv/bin/python scripts/validate_dry_run.py --layout tp4 --layout dp2tp2 --out results.json

The twin (``TWIN``) is the flagship's path at toy shapes: the stream source (the tiny Llama
extracting on every rank, chunks dealt over tp), a buffer smaller than one gathered extraction,
BatchTopK across layers, an async checkpoint, and the streamed native and circuit-tracer exports.
Rank 0 is compared (it holds the most at the end of the run); ``--rank`` picks another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TWIN = [
    "--config", str(ROOT / "train_configs" / "debug_model.toml"),
    "--model.activation=batchtopk", "--model.batchtopk_scope=all",
    "--model.features_per_layer=32768", "--model.k=16", "--loss.sparsity=none",
    "--data.llm_batch_size=64", "--data.buffer_tokens=4096",  # a gathered extraction: 64·31 rows × tp
    "--training.steps=4", "--training.batch_size=1024", "--training.device=cpu",
    "--lr_scheduler.warmup_steps=0", "--standardize.estimate_tokens=4096",
    "--checkpoint.interval=4", "--checkpoint.async_mode=async",
    "--checkpoint.export=true", "--checkpoint.export_circuit_tracer=true",
    "--metrics.log_freq=2", "--metrics.enable_tensorboard=false",
    # FSDP's own collectives, as on NCCL (the flagship's): the CPU-only shared-memory and ring
    # substitutes move the same data outside the collectives the trace counts
    "--parallelism.gloo_shared_memory=false", "--parallelism.gloo_ring_collectives=false",
]  # fmt: skip
LAYOUTS = {
    "tp4": ["--parallelism.dp_shard=1", "--parallelism.tp=4"],
    "dp2tp2": ["--parallelism.dp_shard=2", "--parallelism.tp=2"],
    "tp2": ["--parallelism.dp_shard=1", "--parallelism.tp=2"],
    # clt_8b's layout: the code crosses ranks, y moves by columns
    "tp4_code": ["--parallelism.dp_shard=1", "--parallelism.tp=4", "--parallelism.tp_layout=code"],
    "dp2tp2_code": ["--parallelism.dp_shard=2", "--parallelism.tp=2", "--parallelism.tp_layout=code"],
}
WORLD = {"tp4": 4, "dp2tp2": 4, "tp2": 2, "tp4_code": 4, "dp2tp2_code": 4}
TOLERANCE = 0.15


def measured(layout: str, extra: list[str], folder: Path, mmap_threshold: int = 0) -> list[dict[str, Any]]:
    out = folder / "measured"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD[layout]}",
        str(ROOT / "scripts" / "dry_run.py"), "--measure", str(out),
        *TWIN, *LAYOUTS[layout], *extra, f"--job.dump_folder={folder / 'run'}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if mmap_threshold:  # a fixed threshold: glibc stops raising it, so freed blocks leave the RSS
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"the measured twin failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(WORLD[layout])]


def traced(layout: str, extra: list[str], rank: int) -> dict[str, Any]:
    """The trace, in a fresh process: its host baseline is that process's RSS, which an earlier
    trace in the same process would have raised."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_trace, (layout, extra, rank))


def _trace(layout: str, extra: list[str], rank: int) -> dict[str, Any]:
    from dry_run import trace

    from torchtitan_clt.config import load_config

    cfg = load_config([*TWIN, *LAYOUTS[layout], *extra])
    return trace(cfg, WORLD[layout], None, steps=cfg.training.steps, rank=rank)


def compare(meas: list[dict[str, Any]], tr: dict[str, Any], rank: int) -> dict[str, Any]:
    mine = meas[rank]["phases"]
    phases = {}
    for name, t in tr["phases"].items():
        if name not in mine:
            continue
        m = mine[name]["host_peak_gib"]
        phases[name] = {
            "measured_gib": m,
            "measured_ranks_gib": [r["phases"].get(name, {}).get("host_peak_gib") for r in meas],
            "traced_gib": t["host_peak_gib"],
            "traced_over_measured": round(t["host_peak_gib"] / m, 3) if m else None,
            "within_tolerance": bool(m) and abs(t["host_peak_gib"] / m - 1) <= TOLERANCE,
        }
    return {"host_peak_per_phase": phases, "collective_send_bytes": compare_bytes(mine, tr["phases"])}


def compare_bytes(mine: dict[str, Any], traced: dict[str, Any]) -> dict[str, Any]:
    """Per phase and collective kind, the bytes this rank sent, measured and traced, and their
    sum over the run (a phase's bytes can move to a neighbour where the two runs cut phases
    differently)."""
    from dry_run import PHASES

    out: dict[str, Any] = {}
    total: dict[str, dict[str, int]] = {}
    for name in [p for p in PHASES if p in mine or p in traced]:
        m = mine.get(name, {}).get("collective_send_bytes", {})
        t = traced.get(name, {}).get("collective_send_bytes", {})
        row = {}
        for op in sorted(set(m) | set(t)):
            a, b = int(m.get(op, 0)), int(t.get(op, 0))
            row[op] = {"measured": a, "traced": b, "equal": a == b}
            tot = total.setdefault(op, {"measured": 0, "traced": 0})
            tot["measured"] += a
            tot["traced"] += b
        if row:
            out[name] = {
                "entries": {
                    "measured": mine.get(name, {}).get("entries"),
                    "traced": traced.get(name, {}).get("entries"),
                },
                "bytes": row,
            }
    out["run"] = {
        op: {
            **v,
            "equal": v["measured"] == v["traced"],
            "traced_over_measured": round(v["traced"] / v["measured"], 4) if v["measured"] else None,
        }
        for op, v in total.items()
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", action="append", choices=list(LAYOUTS), help="repeatable; default tp4")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--out", default="", help="write the JSON here too")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="run the twin with MALLOC_MMAP_THRESHOLD_ fixed at this many bytes (glibc otherwise "
        "raises it after big frees and keeps later ones in its heap: RSS above the live bytes)",
    )
    ns, extra = ap.parse_known_args(argv)
    results = []
    for layout in ns.layout or ["tp4"]:
        with tempfile.TemporaryDirectory(prefix="tclt-twin-") as d:
            t0 = time.perf_counter()
            meas = measured(layout, extra, Path(d), ns.mmap_threshold)
            t1 = time.perf_counter()
            tr = traced(layout, extra, ns.rank)
            res = {
                "layout": layout,
                "overrides": [*LAYOUTS[layout], *extra],
                "rank": ns.rank,
                "malloc_mmap_threshold": ns.mmap_threshold or "glibc default (dynamic)",
                **compare(meas, tr, ns.rank),
                "trace_error": tr.get("error"),
                "seconds": {"measured": round(t1 - t0), "traced": round(time.perf_counter() - t1)},
            }
        results.append(res)
        for name, p in res["host_peak_per_phase"].items():
            print(f"{layout:>7} {name:<12} measured {p['measured_gib']:.3f} GiB  traced {p['traced_gib']:.3f} GiB"
                  f"  ratio {p['traced_over_measured']}{'' if p['within_tolerance'] else '  (outside 15%)'}")  # fmt: skip
    out = {"twin": TWIN, "tolerance": TOLERANCE, "results": results}
    if ns.out:
        Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
