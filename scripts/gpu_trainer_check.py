"""What a user runs, on the GPU: the trainer itself for a few steps per case, with its throughput,
MFU and peak memory beside the traced dry run's prediction for the same config (issue 28).

    python scripts/gpu_trainer_check.py --out $OUT/trainer_gpu.json            # on the GPU machine
    .venv/bin/python scripts/gpu_trainer_check.py --device cpu --tiny --out r.json  # a smoke run here

Each case is ``run_train.sh`` (one process; two with NCCL when the machine has two GPUs) on
synthetic activations or on the stream path (the tiny Llama in tests/assets, random weights
extracted on the GPU), bf16 autocast, 20 steps; the run's ``metrics.jsonl`` gives tokens/s and the
peak memory (``torch.cuda.max_memory_allocated``). MFU = tokens/s × the step's FLOPs per token
(scripts/estimate_memory.py's count: encoder 2×, skip 2×, sparse decoder 3× its forward) ÷ the
card's dense bf16 peak. ``--trace CASES`` also runs the traced dry run of each case (``--gpu`` the card
it detects) and reports traced / measured device peak.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak (no sparsity), FLOP/s: the MFU denominator.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
COMMON = [
    "--model.name=clt", "--loss.sparsity=none", "--checkpoint.enable=false",
    "--checkpoint.export=false", "--metrics.enable_tensorboard=false", "--lr_scheduler.warmup_steps=0",
    "--standardize.estimate_tokens=8192", "--eval.enable=false", "--eval.feature_examples_tokens=0",
    "--checkpoint.export_circuit_tracer=false",
]  # fmt: skip


def cases(tiny: bool) -> dict[str, list[str]]:
    """name -> overrides. Full size: N·L past CUDA's 65,535 grid rows, and one case at >= 1e5
    tokens per step for the MFU; ``tiny``: the same cases at toy sizes (the CPU smoke run)."""
    syn = ["--data.source=synthetic"]
    if tiny:
        big = [*syn, "--data.synthetic_n_layers=4", "--data.synthetic_d_model=32",
               "--model.features_per_layer=256", "--training.batch_size=256"]  # fmt: skip
        throughput = big
        stream = ["--config", str(ROOT / "train_configs" / "debug_model.toml"), "--training.batch_size=128"]
    else:
        # 8192 tokens x 16 layers = 131,072 rows per step: past the grid's 65,535 on axis 1.
        big = [*syn, "--data.synthetic_n_layers=16", "--data.synthetic_d_model=1024",
               "--model.features_per_layer=8192", "--training.batch_size=8192"]  # fmt: skip
        # 102,400 tokens per step (issue 28: >= 1e5), 4 layers so the pre-activations fit.
        throughput = [*syn, "--data.synthetic_n_layers=4", "--data.synthetic_d_model=1024",
                      "--model.features_per_layer=8192", "--training.batch_size=102400"]  # fmt: skip
        stream = ["--config", str(ROOT / "train_configs" / "debug_model.toml"), "--training.batch_size=4096"]
    return {
        "jumprelu_NL_past_65535": [*big, "--model.activation=jumprelu"],
        "batchtopk_layer_NL_past_65535": [
            *big,
            "--model.activation=batchtopk",
            "--model.k=32",
            "--model.batchtopk_scope=layer",
        ],  # fmt: skip
        "batchtopk_all_NL_past_65535": [
            *big,
            "--model.activation=batchtopk",
            "--model.k=32",
            "--model.batchtopk_scope=all",
        ],  # fmt: skip
        "batchtopk_all_1e5_tokens_per_step": [
            *throughput,
            "--model.activation=batchtopk",
            "--model.k=32",
            "--model.batchtopk_scope=all",
        ],  # fmt: skip
        "stream_tiny_llama_batchtopk": [*stream, "--model.activation=batchtopk", "--model.k=16"],
    }


def flops_per_token(overrides: list[str]) -> float:
    """The training step's FLOPs per token (sparse decoder), as scripts/estimate_memory.py counts."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from estimate_memory import estimate

    from torchtitan_clt.config import load_config

    cfg = load_config([*COMMON, *overrides, "--training.device=cpu"])
    return estimate(cfg, 1)["flops"]["train step, sparse decoder (fwd+bwd)"]


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def run_case(name: str, overrides: list[str], device: str, steps: int, nproc: int, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [*COMMON, *overrides, f"--training.device={device}", f"--training.steps={steps}",
                f"--metrics.log_freq={max(1, steps // 4)}", f"--job.dump_folder={tmp}", f"--job.name={name}"]  # fmt: skip
        if device == "cuda":
            args.append("--training.mixed_precision=bf16")
        if nproc > 1:
            args += [f"--parallelism.dp_shard={nproc}", "--parallelism.tp=1"]
        env = dict(os.environ, NGPU=str(nproc), PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        env.setdefault("PYTHON", sys.executable)
        t0 = time.perf_counter()
        try:
            r = subprocess.run(
                ["bash", str(ROOT / "run_train.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                text=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout} s"}
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            return {"ok": False, "rc": r.returncode, "log_tail": (r.stdout + r.stderr)[-2500:]}
        rows = [json.loads(x) for x in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines() if x]
        rows = [x for x in rows if "loss" in x and "event" not in x]
        last = rows[-1]
        decoder = next((ln for ln in r.stdout.splitlines() + r.stderr.splitlines() if "decoder:" in ln), "")
        return {
            "ok": True, "wall_s": round(wall, 1), "steps": steps, "loss_first": rows[0]["loss"],
            "loss_last": last["loss"], "tokens_per_s": last.get("tokens_per_s"),
            "peak_mem_gib": last.get("peak_mem_gib"), "decoder_line": decoder.strip()[-200:],
        }  # fmt: skip


def traced_peak(overrides: list[str], gpu: str, timeout: int) -> dict:
    """The dry run of the same config (2 steps): its device peak over the phases."""
    cmd = [sys.executable, str(ROOT / "scripts" / "estimate_memory.py"), *COMMON, *overrides,
           "--training.device=cuda", f"--gpu={gpu}", "--json"]  # fmt: skip
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"trace timed out after {timeout} s"}
    try:
        t = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (r.stdout + r.stderr)[-1500:]}
    return {"device_peak_gib": max(p["device_peak_gib"] for p in t["phases"].values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a smoke run of this script)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--trace", default="", help="comma list of cases also traced (the dry run), or 'all'")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per run")
    ap.add_argument("--cases", default="", help="comma list of cases to run (default: all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch

    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    peak = peak_flops(name)
    card = "h200" if "H200" in name else "h100-80gb"
    out: dict = {"device": name, "torch": torch.__version__, "peak_bf16_flop_per_s": peak, "cases": {}}
    todo = [(c, ov) for c, ov in cases(a.tiny).items() if not a.cases or c in a.cases.split(",")]
    if gpus >= 2:  # the same throughput case over two GPUs (FSDP, NCCL)
        todo.append(("nccl_2gpu_" + todo[0][0], todo[0][1]))
    for case, ov in todo:
        nproc = 2 if case.startswith("nccl_2gpu_") else 1
        res = run_case(case, ov, a.device, a.steps, nproc, a.timeout)
        if res["ok"] and res["tokens_per_s"]:
            fpt = flops_per_token(ov)
            res["flops_per_token"] = fpt
            if peak:
                res["mfu"] = res["tokens_per_s"] * fpt / (peak * nproc)
        traced = a.trace == "all" or case in a.trace.split(",")
        if traced and res["ok"] and a.device == "cuda" and nproc == 1:
            res["traced"] = traced_peak(ov, card, a.timeout)
            if "device_peak_gib" in res["traced"] and res.get("peak_mem_gib"):
                res["traced_over_measured"] = res["traced"]["device_peak_gib"] / res["peak_mem_gib"]
        out["cases"][case] = res
        print(case, json.dumps(res)[:400], flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0 if all(r["ok"] for r in out["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
