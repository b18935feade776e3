"""Will a config fit? The real trainer of the config, traced at its true shapes on this CPU.

    .venv/bin/python scripts/estimate_memory.py --config train_configs/clt_8b.toml
    .venv/bin/python scripts/estimate_memory.py --config train_configs/clt_8b.toml --gpu h200 --json
    .venv/bin/python scripts/estimate_memory.py --config train_configs/debug_model.toml --gpu none

The trace (``scripts/dry_run.py``) runs build -> standardization -> refills -> ``--steps`` steps ->
checkpoint -> end of run on fake tensors (sizes, no memory), one rank of a fake process group of
the config's world size, and reports per phase the peak device and host memory of that rank, what
holds it, and the bytes it moves per step (host->device, each collective). The verdict is the
trace's: every phase within 90% of the named GPU (``--gpu``; ``none``: the config trains on this
CPU and the host peak is the RSS the run should reach). What the trace cannot run is substituted
(listed in the output); ``--quick`` prints only the old hand count, a sanity line beside the trace.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchtitan_clt.checkpoint.save_budget import SaveBudget  # noqa: E402
from torchtitan_clt.config import ConfigError, load_config  # noqa: E402
from torchtitan_clt.distributed.parallel_dims import ParallelDims  # noqa: E402
from torchtitan_clt.protocols import model_registry  # noqa: E402
from torchtitan_clt.protocols.transcoder import TranscoderArgs  # noqa: E402
from torchtitan_clt.tools.exit_codes import user_errors  # noqa: E402
from torchtitan_clt.trainer.dry_run import llm_config  # noqa: E402

GiB = 2**30
# Live tensors of shape [micro-batch, L, F/tp] at the peak of forward+backward, fp32 each. Dense
# activations: pre-activations, activations, the loss's products and their gradients. The sparse
# step keeps the pre-activations and the dense activations (metrics, dead features), and a term
# that reads h (AuxK, pre-activation loss) adds its gradient and one merged copy in backward.
LIVE_FEATURE_TENSORS = {"dense": 6, "sparse": 4}
# The interpreter, torch and the libraries before anything is built (measured peak RSS, CPU).
CPU_RUNTIME_BYTES = int(0.3 * 2**30)
# A gloo process group and the DTensor machinery on top of that, per rank (measured, CPU).
CPU_DIST_RUNTIME_BYTES = int(0.1 * 2**30)
H100_GIB = 79.0


def llm_stats(cfg) -> dict:
    """Parameters, layers and widths of the LLM (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    conf = llm_config(cfg.data.model_path)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(conf)
    n_params = sum(p.numel() for p in llm.parameters())
    n_layers = conf.num_hidden_layers
    layers = list(cfg.data.layers) or list(range(n_layers))
    return {
        "params": n_params,
        "n_layers": n_layers,
        "layers": layers,
        "d_model": conf.hidden_size,
        "intermediate": getattr(conf, "intermediate_size", 4 * conf.hidden_size),
        # Forward stops after the last hooked layer: that fraction of the block FLOPs.
        "used_frac": (max(layers) + 1) / n_layers,
    }


def tp_plan(family: str) -> dict[str, int | None]:
    """The family's tensor-parallel plan (its ``ModelSpec.tp_plan``; empty: no tensor parallelism)."""
    return model_registry.get(family).tp_plan or {}


def sharded_numel(model: torch.nn.Module, plan: dict, tp: int, fsdp: int) -> tuple[int, int]:
    """(parameters held per GPU, parameters of this GPU's tp shard before FSDP)."""
    from torchtitan_clt.distributed.tensor_parallel import placement_for

    per_gpu = tp_local = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if plan and tp > 1:
            try:
                if placement_for(name, plan) is not None:
                    n //= tp
            except ValueError:
                pass
        tp_local += n
        per_gpu += -(-n // fsdp)
    return per_gpu, tp_local


def decoder_path(model: torch.nn.Module, dims: ParallelDims) -> str:
    """What the training forward would run on this mesh (the model's own words)."""
    from torchtitan_clt.protocols.transcoder import MeshGroups

    if not hasattr(model, "decoder_path"):
        return "dense"
    model.set_mesh_groups(MeshGroups(batch_scale=dims.dp_degree, feature_shards=dims.tp))
    return model.decoder_path()


def estimate(cfg, ngpu: int) -> dict:
    p = cfg.parallelism
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, ngpu)
    m, d, t = cfg.model, cfg.data, cfg.training
    if d.source == "synthetic":
        llm = None
        L, d_model = d.synthetic_n_layers, d.synthetic_d_model
    else:
        llm = llm_stats(cfg)
        L, d_model = len(llm["layers"]), llm["d_model"]
    F, k, tp = m.features_per_layer, m.k, dims.tp
    args = TranscoderArgs.from_job_config(
        cfg, L, d_model, d_model, list(range(L)), d.model_path, d.hook_in, d.hook_out
    )
    with torch.device("meta"):
        model = model_registry.get(m.name).build_fn(args)
    path = decoder_path(model, dims)
    n_params = sum(q.numel() for q in model.parameters())
    per_gpu, tp_local = sharded_numel(model, tp_plan(m.name), tp, dims.dp_shard)
    gpu = torch.cuda.is_available() or t.device != "cpu"
    compute_bytes = 2 if (gpu and t.mixed_precision != "fp32") else 4
    B = t.batch_size // (dims.dp_degree * t.grad_accum_steps)  # micro-batch rows per GPU
    rows = {}
    rows["dictionary params (fp32, sharded)"] = 4 * per_gpu
    rows["gradients (fp32, sharded)"] = 4 * per_gpu
    rows["AdamW m, v (fp32)"] = 8 * per_gpu
    if dims.fsdp_enabled:
        # FSDP gathers this GPU's tp shard for forward/backward, and holds unsharded grads until
        # the reduce-scatter: one dictionary unit, so the whole tp shard at once; the
        # reduce-scatter copies the unsharded grads into one flat input buffer (fp32 reduction).
        rows["FSDP gathered params + grads"] = 2 * compute_bytes * tp_local
        w = dims.dp_shard
        if not gpu and w > 1 and cfg.parallelism.gloo_shared_memory:
            # distributed/shm_comm.py: one [w, tp_local] segment; a rank maps the gather's row,
            # its own reduce-scatter row and its chunk of each other row
            rows["FSDP /dev/shm segment (as one rank maps it)"] = 4 * tp_local * (2 + max(w - 2, 0) / w)
        else:
            rows["FSDP reduce-scatter input"] = 4 * tp_local
    elif compute_bytes == 2:
        rows["autocast bf16 weight copies"] = 2 * tp_local
    live = LIVE_FEATURE_TENSORS["sparse" if path.startswith("sparse") else "dense"]
    rows[f"activations [B={B}, L, F/tp] x{live}"] = live * 4 * B * L * (F // tp)
    rows["batch x, y, y_hat, grad (fp32)"] = 4 * 4 * B * L * d_model
    llm_bytes = 2 if gpu else 4
    if llm is not None:
        rows["LLM weights (bf16)" if gpu else "LLM weights (fp32)"] = llm_bytes * llm["params"]
        ctx_tokens = d.llm_batch_size * d.seq_len
        # Per hooked layer, inputs and targets kept; per layer transient: residual, attention
        # in/out, the MLP's gate/up/act intermediates.
        rows["LLM forward activations"] = (
            llm_bytes * ctx_tokens * (2 * L * d_model + 6 * d_model + 3 * llm["intermediate"])
        )
        buf_dev = d.buffer_device if d.buffer_device != "auto" else ("cuda" if gpu else "cpu")
        buf = d.buffer_tokens * L * 2 * d_model * llm_bytes
        if buf_dev == "cuda":
            rows["shuffle buffer (on GPU)"] = buf
    if not gpu:
        rows["runtime (interpreter, torch)"] = CPU_RUNTIME_BYTES
        if ngpu > 1:
            rows["runtime (gloo process group, DTensor)"] = CPU_DIST_RUNTIME_BYTES
    total = sum(rows.values())
    # FLOPs per training token (multiply-add = 2). Weight gradients double the forward; inputs
    # need no gradient, so the encoder costs 2x its forward and the decoder 3x (dacts + dW).
    n_pairs = L * (L + 1) // 2 if m.name.startswith("clt") or m.name.startswith("matryoshka") else L
    enc = 2 * L * F * d_model
    dec_dense = 2 * F * d_model * n_pairs
    dec_sparse = 2 * k * d_model * n_pairs
    # The skip path costs 2x its forward in training, like the encoder.
    skip = 2 * L * d_model * d_model if getattr(model, "W_skip", None) is not None else 0
    flops = {
        "encoder fwd": enc,
        "decoder fwd (dense)": dec_dense,
        "decoder fwd (sparse, k active/layer)": dec_sparse,
        **({"skip path fwd": skip} if skip else {}),
        "train step, sparse decoder (fwd+bwd)": 2 * (enc + skip) + 3 * dec_sparse,
        "train step, dense decoder (fwd+bwd)": 2 * (enc + skip) + 3 * dec_dense,
    }
    if llm is not None:
        flops["LLM extraction (fwd, truncated)"] = 2 * llm["params"] * llm["used_frac"]
    return {
        "dims": dims, "n_params": n_params, "per_gpu": per_gpu, "rows": rows, "total": total,
        "flops": flops, "L": L, "d": d_model, "F": F, "B": B, "llm": llm, "decoder_path": path,
        "buffer_cpu": (d.buffer_tokens * L * 2 * d_model * llm_bytes) if llm is not None else 0,
    }  # fmt: skip


def report(cfg, est: dict) -> str:
    dims = est["dims"]
    out = [
        f"{cfg.model.name} / {cfg.model.activation}: L={est['L']} d={est['d']} F={est['F']} "
        f"({est['L'] * est['F'] / 1e6:.2f} M features), {est['n_params'] / 1e9:.2f} B parameters",
        f"mesh: {dims}, micro-batch {est['B']} rows per GPU",
        f"decoder: {est['decoder_path']}",
        "",
        f"{'per GPU':<44}{'GiB':>10}",
    ]
    for name, b in est["rows"].items():
        out.append(f"  {name:<42}{b / GiB:>10.2f}")
    out.append(f"  {'total':<42}{est['total'] / GiB:>10.2f}")
    verdict = "fits" if est["total"] / GiB <= H100_GIB else "does NOT fit"
    out.append(f"  -> {verdict} on an 80 GB H100 (~{H100_GIB:.0f} GiB usable)")
    if est["llm"] is not None and cfg.data.buffer_device == "cpu":
        out.append(f"  (shuffle buffer on host RAM: {est['buffer_cpu'] / GiB:.1f} GiB per rank)")
    out += ["", f"{'FLOPs per token':<44}{'GFLOP':>10}"]
    for name, f in est["flops"].items():
        out.append(f"  {name:<42}{f / 1e9:>10.2f}")
    return "\n".join(out)


def trace_table(t: dict) -> str:
    """The trace's result as a table, a line per phase."""
    gpu = t["gpu"] or "this CPU"
    out = [
        f"traced on fake tensors: rank 0 of {t['world_size']}, {gpu}"
        + (f" (fits: <= {t['device_limit_gib']} GiB, 90% of {t['gpu_gib']})" if t["gpu"] else ""),
        "",
        f"{'phase':<12}{'device GiB':>11}{'host GiB':>10}  what holds the device peak (GiB)",
    ]
    for name, ph in t["phases"].items():
        held = ph["held_at_peak_gib"].get("device" if t["gpu"] else "host", {})
        what = ", ".join(f"{k} {v:.1f}" for k, v in list(held.items())[:4])
        dev = f"{ph['device_peak_gib']:.2f}" if t["gpu"] else "-"
        out.append(f"{name:<12}{dev:>11}{ph['host_peak_gib']:>10.2f}  {what}")
    ps = t["per_step"]
    out += [
        "",
        f"per step and rank: host->device {ps['h2d_bytes'] / GiB:.3f} GiB, collectives sent "
        f"{ps['collective_send_bytes'] / GiB:.3f} GiB ("
        + ", ".join(f"{k} {v / GiB:.3f}" for k, v in ps.get("collectives", {}).items())
        + ")",
        "allowances (not tensors): " + ", ".join(f"{k} {v} GiB" for k, v in t["allowances_gib"].items()),
        "substituted: " + "; ".join(t["substituted"]),
    ]
    if t["error"]:
        out += ["", f"THE TRACE STOPPED: {t['error']}"]
    elif t["gpu"]:
        out.append(f"-> {'fits' if t['fits'] else 'does NOT fit'} on {t['gpu']} at every phase")
    return "\n".join(out)


def save_budget(cfg, ns, hand: dict, ngpu: int) -> SaveBudget:
    """The checkpoint's save time against the preemption signal's lead (``checkpoint/save_budget``):
    per rank its shard of fp32 weights and AdamW m, v (12 bytes per parameter)."""
    per_node = min(ns.gpus_per_node, ngpu)
    lead = ns.signal_lead or cfg.checkpoint.signal_lead_s or 120.0
    nodes = max(1, -(-ngpu // per_node))
    return SaveBudget(12 * hand["per_gpu"], per_node, ns.storage_gbps, lead, nodes)


def main(argv: list[str] | None = None) -> int:
    import json

    from dry_run import GPUS, trace

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="TOML config (or --config FILE, as for run_train.sh)")
    ap.add_argument("--config", dest="config_opt", metavar="FILE", default=None)
    ap.add_argument(
        "--ngpu", type=int, default=0, help="total GPUs (world size); default: the mesh's product or 8"
    )
    ap.add_argument("--gpu", default="", help=f"the card: {', '.join(GPUS)}, or none (a CPU run); default "
                    "h100-80gb, or none when training.device = cpu")  # fmt: skip
    ap.add_argument("--steps", type=int, default=2, help="training steps traced (default 2)")
    ap.add_argument("--json", action="store_true", help="print the trace as one JSON object (last line)")
    ap.add_argument("--quick", action="store_true", help="only the hand count (no trace)")
    ap.add_argument("--sweep", default="", help="hand count: comma list of GPU counts, e.g. 8,16,32,64")
    ap.add_argument(
        "--storage-gbps",
        type=float,
        default=2.0,
        help="checkpoint write bandwidth per node, GB/s, for the save-time line (default 2)",
    )
    ap.add_argument(
        "--signal-lead",
        type=float,
        default=0.0,
        help="seconds between the preemption signal "
        "and the kill (default: checkpoint.signal_lead_s, else 120 as scripts/slurm_train.sh)",
    )
    ap.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    ns, overrides = ap.parse_known_args(argv)
    if not (ns.config or ns.config_opt):
        ap.error("give the config: --config FILE (or FILE)")
    with user_errors("estimate_memory"):  # a bad config or file: one line, exit 2
        cfg = load_config(["--config", ns.config_opt or ns.config, *overrides])
        p = cfg.parallelism
        ngpu = ns.ngpu or (
            p.dp_replicate * p.dp_shard * p.tp if p.dp_shard > 0 else max(8, p.dp_replicate * p.tp)
        )
        gpu = ns.gpu or ("none" if cfg.training.device == "cpu" else "h100-80gb")
        if gpu != "none" and gpu not in GPUS:
            raise ConfigError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}, or none.")
        hand = estimate(cfg, ngpu)
        save = save_budget(cfg, ns, hand, ngpu)
        if ns.quick:
            print(report(cfg, hand))
            print(save.line())
        else:
            t = trace(cfg, ngpu, None if gpu == "none" else gpu, steps=ns.steps)
            t["hand_count_gib"] = round(hand["total"] / GiB, 2)
            t["checkpoint_save"] = {"line": save.line(), "save_s": save.save_s, "fits": save.fits}
            if ns.json:
                print(json.dumps(t))
            else:
                print(trace_table(t))
                print(f"(the hand count, no trace: {hand['total'] / GiB:.2f} GiB per GPU; --quick shows it)")
                print(save.line())
            if t["error"]:
                return 1
    if ns.sweep:
        print(f"\n{'GPUs':>6}{'GiB per GPU':>14}  fits H100-80GB")
        for n in [int(v) for v in ns.sweep.split(",")]:
            # Fewer GPUs than the config's tp: shard features over all of them instead.
            sweep_cfg = copy.deepcopy(cfg)
            sp = sweep_cfg.parallelism
            if n % (sp.dp_replicate * sp.tp):
                sp.dp_replicate, sp.dp_shard, sp.tp = 1, -1, min(sp.tp, n)
            try:
                e = estimate(sweep_cfg, n)
            except Exception as err:  # noqa: BLE001 - a layout that cannot be built
                print(f"{n:>6}  {err}")
                continue
            fits = "yes" if e["total"] / GiB <= H100_GIB else "no"
            print(f"{n:>6}{e['total'] / GiB:>14.1f}  {fits:<4} ({e['dims']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
