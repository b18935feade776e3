"""Kernel suite: each op against the dense PyTorch way and the torch fallback; a whole CLT step
sparse vs dense. JSON out; nothing here is asserted by tests.

  .venv/bin/python scripts/benchmark_kernels.py --device cpu --out benchmarks/results/kernels_cpu.json
  python scripts/benchmark_kernels.py --device cuda --out $OUT/kernels_gpu.json     # on a GPU

GPU rows carry the floor: ``bytes / measured copy bandwidth`` for memory-bound ops and ``FLOPs /
measured bf16 matmul rate`` for the step; ``floor_ratio = time / floor`` (1.0 = at the floor).
On CPU the Triton path only runs in the interpreter, so CPU rows time the torch fallback and the
dense way, plus the CPU step comparison (F=8192/layer, L=12, d=768, k=32, 1024 tokens by default;
fwd + bwd + fused AdamW, sparse and dense steps alternated so both see the same machine load).

One file over 400 lines on purpose: every op's rows, baselines and floors sit side by side so one
run on a lent GPU (scripts/gpu_check.sh) measures them all against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_clt.kernels import dispatch  # noqa: E402
from torchtitan_clt.kernels.backend import has_triton  # noqa: E402
from torchtitan_clt.kernels.sparse_step import clt_dense_loss, clt_sparse_loss  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds per call (host clock around synchronized calls; CUDA: events)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(dev: torch.device) -> dict:
    """Measured copy bandwidth (read + write bytes / s) on this device, and on GPU bf16 matmul
    FLOP/s."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=dev).uniform_()  # 1 GiB
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), dev, 10, 3)
    if dev.type != "cuda":
        return {"copy_bytes_per_s": 2 * 4 * (1 << 28) / t}
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    tm = timeit(lambda: a @ b, dev, 10, 3)
    return {"copy_bytes_per_s": 2 * 4 * (1 << 28) / t, "bf16_matmul_flop_per_s": 2 * n**3 / tm}


def row(
    name: str, impl: str, t: float, nbytes: float = 0.0, flops: float = 0.0, ceil: dict | None = None, **extra
) -> dict:
    r = {"op": name, "impl": impl, "ms": t * 1e3, **extra}
    if nbytes:
        r["GB_per_s"] = nbytes / t / 1e9
    if flops:
        r["TFLOP_per_s"] = flops / t / 1e12
    if ceil and nbytes:
        r["floor_ratio_bw"] = t / (nbytes / ceil["copy_bytes_per_s"])
    if ceil and flops and "bf16_matmul_flop_per_s" in ceil:
        r["floor_ratio_flops"] = t / (flops / ceil["bf16_matmul_flop_per_s"])
    print(json.dumps(r), flush=True)
    return r


def impls(dev: torch.device) -> list[str]:
    return ["torch", "triton"] if (dev.type == "cuda" and has_triton()) else ["torch"]


def bench_select(dev, n, n_layers, f, k, reps, ceil) -> list[dict]:
    out = []
    h = torch.randn(n, n_layers, f, device=dev)
    nbytes = h.numel() * h.element_size()
    shape = {"N": n, "L": n_layers, "F": f, "k": k}
    h2 = h.view(n * n_layers, f)
    out.append(
        row(
            "topk",
            "dense_torch.topk",
            timeit(lambda: torch.topk(h2, k, dim=-1), dev, reps),
            nbytes,
            ceil=ceil,
            **shape,
        )
    )
    for b in impls(dev):
        out.append(
            row(
                "topk",
                b,
                timeit(lambda b=b: dispatch.topk_select(h2, k, backend=b), dev, reps),
                nbytes,
                ceil=ceil,
                **shape,
            )
        )
    flat = h.transpose(0, 1).reshape(n_layers, -1)
    out.append(
        row(
            "batchtopk_threshold",
            "dense_topk_flat",
            timeit(lambda: torch.topk(flat, k * n, dim=-1), dev, reps),
            nbytes,
            ceil=ceil,
            **shape,
        )
    )
    for b in impls(dev):
        # bytes actually read: Triton radix select reads h 4 times (+ count + compact = 6 for select);
        # the torch fallback reads it once (per-row topk candidates), the rest works on candidates
        passes = (4, 6) if b == "triton" else (1, 1)
        out.append(
            row(
                "batchtopk_threshold",
                b,
                timeit(lambda b=b: dispatch.batchtopk_threshold(h, k * n, "layer", backend=b), dev, reps),
                passes[0] * nbytes,
                ceil=ceil,
                passes=passes[0],
                **shape,
            )
        )
        out.append(
            row(
                "batchtopk_select",
                b,
                timeit(lambda b=b: dispatch.batchtopk_select(h, k, "layer", backend=b), dev, reps),
                passes[1] * nbytes,
                ceil=ceil,
                passes=passes[1],
                **shape,
            )
        )
    return out


def bench_decode(dev, n, f, dim, k, reps, ceil, dtype) -> list[dict]:
    out = []
    w = (torch.randn(f, dim, device=dev) / dim**0.5).to(dtype).requires_grad_(True)
    idx = torch.stack([torch.randperm(f, device=dev)[:k] for _ in range(n)]).sort(-1).values
    vals = torch.rand(n, k, device=dev, requires_grad=True)
    g = torch.randn(n, dim, device=dev)
    es = w.element_size()
    uniq = int(torch.unique(idx).numel())
    fwd_bytes = uniq * dim * es + n * dim * 4 + idx.numel() * 12  # active rows once, out, idx+vals
    shape = {"N": n, "F": f, "D": dim, "k": k, "dtype": str(dtype).replace("torch.", ""), "unique_rows": uniq}
    acts = torch.zeros(n, f, device=dev).scatter(1, idx, vals.detach()).to(dtype)
    out.append(
        row(
            "decode_fwd",
            "dense_matmul",
            timeit(lambda: acts @ w, dev, reps),
            flops=2 * n * f * dim,
            ceil=ceil,
            **shape,
        )
    )
    for b in impls(dev):

        def fwd(b=b):
            with torch.no_grad():
                return dispatch.sparse_decode(idx, vals, w, backend=b, density_threshold=1.0)

        def fwd_bwd(b=b):
            o = dispatch.sparse_decode(idx, vals, w, backend=b, density_threshold=1.0)
            torch.autograd.grad(o, (vals, w), g)

        out.append(row("decode_fwd", b, timeit(fwd, dev, reps), fwd_bytes, ceil=ceil, **shape))
        # bwd: active rows again (grad vals) + grad W written whole (dense grad) + grad_out read twice
        fb_bytes = fwd_bytes + uniq * dim * es + f * dim * es + 2 * n * dim * 4
        out.append(row("decode_fwd_bwd", b, timeit(fwd_bwd, dev, reps), fb_bytes, ceil=ceil, **shape))
    return out


def make_clt(dev, n_layers, f, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype).requires_grad_(True)

    w_enc = rnd(n_layers, f, d, scale=d**-0.5)
    b_enc = rnd(n_layers, f, scale=0.0)
    w_dec = [rnd(f, n_layers - s, d, scale=(f * n_layers) ** -0.5) for s in range(n_layers)]
    b_dec = rnd(n_layers, d, scale=0.0)
    return [w_enc, b_enc, *w_dec, b_dec]


def clt_plain_dense_loss(x, y, w_enc, b_enc, w_dec, b_dec, k: int, scope: str = "layer"):
    """The CLT step as plain PyTorch writes it (the baseline a user starts from): dense encoder,
    BatchTopK by ``torch.topk`` over the flattened batch, dense activations, matmul decoder."""
    n, n_layers, _ = x.shape
    n_features = w_enc.shape[1]
    h = torch.einsum("nld,lfd->nlf", x, w_enc) + b_enc
    flat = h.transpose(0, 1).reshape(n_layers, -1) if scope == "layer" else h.reshape(1, -1)
    vals, idx = flat.topk(k * n * (1 if scope == "layer" else n_layers), dim=-1)
    acts = torch.zeros_like(flat).scatter(-1, idx, torch.relu(vals))
    acts = acts.view(n_layers, n, n_features).transpose(0, 1) if scope == "layer" else acts.view_as(h)
    y_hat = b_dec.expand(n, n_layers, b_dec.shape[-1])
    for s, w in enumerate(w_dec):
        contrib = (acts[:, s] @ w.reshape(n_features, -1)).view(n, n_layers - s, -1)
        y_hat = y_hat + torch.nn.functional.pad(contrib, (0, 0, s, 0))
    loss = (y_hat - y).pow(2).sum(dim=(1, 2)).mean()
    return loss, {"recon": loss.detach()}


STEP_LOSSES = {
    "sparse": clt_sparse_loss,
    "dense": clt_dense_loss,
    "plain_dense": clt_plain_dense_loss,
    "plain_dense_default_adamw": clt_plain_dense_loss,
}


def bench_step(
    dev,
    n,
    n_layers,
    f,
    d,
    k,
    reps,
    ceil,
    dtype,
    which=("sparse", "dense", "plain_dense", "plain_dense_default_adamw"),
) -> list[dict]:
    """Whole CLT step (forward, backward, fused AdamW) with BatchTopK: the sparse step, the same
    step with a dense decoder (our selection), and a plain PyTorch dense step (``torch.topk``),
    also as a user writes it first, with ``torch.optim.AdamW``'s default implementation."""
    params = make_clt(dev, n_layers, f, d, dtype)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    opts = {"plain_dense_default_adamw": torch.optim.AdamW(params, lr=1e-4)}
    x = torch.randn(n, n_layers, d, device=dev, dtype=dtype)
    y = torch.randn(n, n_layers, d, device=dev, dtype=dtype)
    span = n_layers * (n_layers + 1) // 2
    useful = 2 * n * n_layers * f * d + 3 * 2 * n * k * span * d + 2 * 2 * n * n_layers * k * d
    dense_flops = 3 * 2 * n * n_layers * f * d + 3 * 2 * n * f * span * d
    shape = {
        "N": n,
        "L": n_layers,
        "F": f,
        "d": d,
        "k": k,
        "dtype": str(dtype).replace("torch.", ""),
        "params_M": sum(p.numel() for p in params) / 1e6,
    }
    out = []

    def step(kind):
        o = opts.get(kind, opt)
        o.zero_grad(set_to_none=True)
        args = (x, y, params[0], params[1], params[2:-1], params[-1], k, "layer")
        loss, _ = STEP_LOSSES[kind](*args)
        loss.backward()
        o.step()

    # alternate the two kinds, so that both see the same machine load (CPU hosts are often shared)
    times: dict[str, list[float]] = {kind: [] for kind in which}
    for kind in which:
        step(kind)  # warm-up
    for _ in range(reps):
        for kind in which:
            times[kind].append(timeit(lambda kind=kind: step(kind), dev, 1, 0))
    for kind in which:
        t = statistics.median(times[kind])
        out.append(
            row(
                "clt_step",
                kind,
                t,
                flops=useful if kind == "sparse" else dense_flops,
                ceil=ceil,
                useful_TFLOP_per_s=useful / t / 1e12,
                all_ms=[v * 1e3 for v in times[kind]],
                **shape,
            )
        )
    t_opt = timeit(lambda: opt.step(), dev, reps)
    out.append(row("clt_step", "adamw_fused_only", t_opt, **shape))
    if dev.type == "cpu" and "copy_bytes_per_s" in ceil:
        out.append(step_floor(params, x, k, t_opt, ceil, dev, reps, shape))
    by = {r["impl"]: r["ms"] for r in out}
    for base in ("dense", "plain_dense", "plain_dense_default_adamw"):
        for step_kind in ("sparse", "floor"):
            if step_kind in by and base in by:
                out.append(
                    {
                        "op": "clt_step",
                        "impl": f"{base}_over_{step_kind}",
                        "ratio": by[base] / by[step_kind],
                        **shape,
                    }
                )
                print(json.dumps(out[-1]), flush=True)
    return out


def step_floor(params, x, k: int, t_opt: float, ceil: dict, dev, reps: int, shape: dict) -> dict:
    """What any exact sparse step of this shape costs at least on this CPU (``impl="floor"``):
    the fused AdamW update (measured: it reads and writes every parameter and its state), the
    encoder's dense matmul (measured), and at the measured copy bandwidth the bytes the rest must
    move: the weight gradient written once (AdamW reads it dense) and every decoder row that this
    batch's selection touches read twice (the forward, then the gradient at the activations).
    The update reads a complete gradient, as in every step measured here (and as clipping by the
    global norm requires). ``plain_dense_over_floor`` is then the most a sparse step can be
    faster than a plain one."""
    w_enc, b_enc, *w_dec, b_dec = params
    n, n_layers, d = x.shape
    with torch.no_grad():

        def encoder():
            return torch.baddbmm(b_enc.unsqueeze(1), x.transpose(0, 1), w_enc.transpose(1, 2))  # [L, N, F]

        h = encoder()
        t_enc = timeit(encoder, dev, reps)
        touched = [
            int(torch.unique(h[s].flatten().topk(k * n).indices % h.shape[-1]).numel())
            for s in range(n_layers)
        ]
    elt = w_enc.element_size()
    grad_bytes = elt * sum(p.numel() for p in params)
    row_bytes = [elt * w[0].numel() for w in w_dec]  # one feature's write to every later layer
    decoder_reads = 2 * sum(t * b for t, b in zip(touched, row_bytes))
    t_mem = (grad_bytes + decoder_reads) / ceil["copy_bytes_per_s"]
    r = {
        "op": "clt_step",
        "impl": "floor",
        "ms": (t_opt + t_enc + t_mem) * 1e3,
        "adamw_ms": t_opt * 1e3,
        "encoder_matmul_ms": t_enc * 1e3,
        "memory_ms": t_mem * 1e3,
        "memory_GB": (grad_bytes + decoder_reads) / 1e9,
        "copy_GB_per_s": ceil["copy_bytes_per_s"] / 1e9,
        "touched_features_per_layer": touched,
        **shape,
    }
    print(json.dumps(r), flush=True)
    return r


# glibc returns every large freed block to the OS (mmap/munmap), so each step's fresh gradient and
# activation tensors page-fault again; on CPU that costs as much as the arithmetic for both paths.
# Keep freed memory in the heap instead (the usual CPU-PyTorch tuning); --no-malloc-tuning skips it.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def _reexec_with_malloc_tuning(argv: list[str]) -> None:
    if any(os.environ.get(k) for k in _MALLOC_ENV) or "--no-malloc-tuning" in argv:
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC_ENV})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="few sizes, few repetitions")
    ap.add_argument("--out", default="")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per timing (0: by device)")
    ap.add_argument("--step-batch", type=int, nargs="+", default=[1024], help="tokens per CPU CLT step")
    ap.add_argument("--skip", nargs="*", default=[], choices=["select", "decode", "step"])
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip further sizes after this many seconds")
    ap.add_argument(
        "--no-malloc-tuning", action="store_true", help="CPU: keep glibc's default mmap threshold"
    )
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        _reexec_with_malloc_tuning(sys.argv)
    torch.manual_seed(0)
    ceil = ceilings(dev)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor()})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ceilings": ceil,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "malloc_env": {k: os.environ.get(k) for k in _MALLOC_ENV},
        "argv": sys.argv[1:],
        "rows": [],
    }
    rows = result["rows"]
    gpu = dev.type == "cuda"
    reps = args.reps or (10 if gpu else 3) // (2 if args.quick else 1)
    if gpu:
        sel = (
            [(4096, 16, 16384, 32)]
            if args.quick
            else [(4096, 16, 16384, 32), (4096, 26, 16384, 64), (2048, 32, 65536, 128)]
        )
        dec = (
            [(4096, 16384, 16 * 2048, 32)]
            if args.quick
            else [
                (4096, 16384, 16 * 2048, 16),
                (4096, 16384, 26 * 2304, 32),
                (4096, 65536, 16 * 2048, 64),
                (4096, 16384, 32 * 4096, 128),
                (4096, 65536, 2304, 128),
            ]
        )
        # 4.6G decoder params: bf16 weights + grads + AdamW state ~ 40 GB, fits one H100
        steps = [(4096, 16, 16384, 2048, 32)]
        dtype = torch.bfloat16
    else:
        sel = [(256, 4, 4096, 32)] if args.quick else [(512, 12, 8192, 32)]
        dec = [(256, 4096, 4 * 768, 32)] if args.quick else [(512, 8192, 12 * 768, 32), (512, 8192, 768, 32)]
        steps = [(128, 4, 2048, 768, 32)] if args.quick else [(b, 12, 8192, 768, 32) for b in args.step_batch]
        dtype = torch.float32
    t_start = time.perf_counter()
    jobs = []
    if "step" not in args.skip:  # the headline number first, so a time budget never drops it
        jobs += [
            (bench_step, (n, n_layers, f, d, k, max(2, reps), ceil, dtype)) for n, n_layers, f, d, k in steps
        ]
    if "decode" not in args.skip:
        jobs += [(bench_decode, (n, f, dim, k, reps, ceil, dtype)) for n, f, dim, k in dec]
    if "select" not in args.skip:
        jobs += [(bench_select, (n, n_layers, f, k, reps, ceil)) for n, n_layers, f, k in sel]
    for fn, fargs in jobs:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            result.setdefault("skipped_over_budget", []).append(f"{fn.__name__}{fargs[:5]}")
            continue
        try:
            rows += fn(dev, *fargs)
        except torch.OutOfMemoryError as e:  # record and go on: one size too big is not a failed suite
            rows.append({"op": fn.__name__, "args": str(fargs[:5]), "error": f"OOM: {e}"[:300]})
        if gpu:
            torch.cuda.empty_cache()
        _write(args.out, result)  # partial results survive a timeout
    _write(args.out, result)


def _write(path: str, result: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
