"""Dictionary quality on a fixed recipe: held-out FVU (mean and per layer), L0, dead fraction,
CE recovered (closed loop: every covered layer replaced at once) and wall time, one row per
activation, each a full trainer run from the same config (``train_configs/quality_smollm2_clt_topk.toml``:
SmolLM2-135M layers 0-7, resid_mid -> mlp_out, F = 2048 per layer, 234 steps x 512 tokens over a
~60k-token training text seen twice; held out: the plays' documents the stream never reads).

Rows run with the trainer's defaults for their activation; only what defines the row is set.

  .venv/bin/python scripts/benchmark_quality.py --out benchmarks/results/quality_cpu.json
  .venv/bin/python scripts/benchmark.py --suite quality            # the same, from the suite runner
  .venv/bin/python scripts/benchmark_quality.py --rows topk_k16 --override=--optimizer.lr=2e-3

Speeds up nothing by itself: each row extracts its own activations, as a user's run does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train_configs" / "quality_smollm2_clt_topk.toml"
REFERENCE = ROOT / "torchtitan_clt" / "metrics" / "quality_reference.json"

ROWS = {
    # name: overrides on top of CONFIG (which is the TopK k=16 row)
    "topk_k16": [],
    "batchtopk_layer_k16": ["--model.activation=batchtopk", "--model.batchtopk_scope=layer"],
    "batchtopk_all_k16": ["--model.activation=batchtopk", "--model.batchtopk_scope=all"],
    # JumpReLU with the tanh penalty (warmed up over 50 steps); λ = 2.2 for held-out L0 ≈ 16 with
    # the skip path on (probes on this recipe: λ = 5 gave L0 5.6, λ = 2 gave 17.8)
    "jumprelu_tanh": [
        "--model.activation=jumprelu",
        "--loss.sparsity=tanh",
        "--loss.lambda_sparsity=2.2",
        "--loss.lambda_warmup_steps=50",
    ],
}


def run_row(name: str, overrides: list[str], folder: Path, eval_tokens: int) -> dict:
    # run_train.sh: the user's command (its CPU allocator settings and the config check included)
    cmd = [
        str(ROOT / "run_train.sh"),
        "--config",
        str(CONFIG),
        f"--job.dump_folder={folder}",
        f"--job.name={name}",
        "--checkpoint.enable=false",
        "--metrics.enable_tensorboard=false",
        *([f"--eval.tokens={eval_tokens}"] if eval_tokens else []),
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"row": name, "overrides": overrides, "error": proc.stderr[-4000:]}
    report = json.loads((folder / name / "report" / "eval.json").read_text())
    h, fs = report["headline"], report["feature_stats"]
    return {
        "row": name,
        "overrides": overrides,
        "fvu": h["fvu"],
        "fvu_per_layer": fs["fvu_per_layer"],
        "l0": h["l0"],
        "l0_per_layer": fs["l0_per_layer"],
        "dead_frac": h["dead_frac"],
        "ce_recovered_zero": h["ce_recovered_zero"],
        "ce_recovered_mean": h["ce_recovered_mean"],
        "delta_ce": h["delta_ce"],
        "kl": h["kl"],
        "tokens_scored": h["tokens_scored"],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument(
        "--override", nargs="*", action="extend", default=[], help="extra --section.field=value for every row"
    )
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens scored (0: the config's)")
    ap.add_argument("--keep", default="", help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--write-reference",
        action="store_true",
        help="also write the rows into the package (torchtitan_clt/metrics/quality_reference.json): "
        "every run's report then draws them beside its own FVU-L0 point",
    )
    args = ap.parse_args()
    result = {
        "suite": "quality",
        "config": str(CONFIG.relative_to(ROOT)),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        for name in args.rows:
            r = run_row(name, [*ROWS[name], *args.override], folder, args.eval_tokens)
            result["rows"].append(r)
            if "error" in r:
                print(f"quality {name}: FAILED\n{r['error']}", flush=True)
                continue
            print(
                f"quality {name:22s} FVU {r['fvu']:.4f}  L0 {r['l0']:5.2f}  dead {r['dead_frac']:.3f}  "
                f"CE recovered {r['ce_recovered_zero']:.3f} (zero) {r['ce_recovered_mean']:.3f} (mean)  "
                f"{r['wall_s']:.0f} s",
                flush=True,
            )
    if args.write_reference:
        ok = [r for r in result["rows"] if "error" not in r]
        ref = {
            "recipe": "SmolLM2 L0-7, F=2048, 234 x 512 tokens",
            "source": args.out or "scripts/benchmark_quality.py",
            "time": result["time"],
            "rows": [{k: r[k] for k in ("row", "fvu", "l0", "dead_frac", "ce_recovered_zero")} for r in ok],
        }
        REFERENCE.write_text(json.dumps(ref, indent=2) + "\n")
        print(f"wrote {REFERENCE.relative_to(ROOT)}")
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
