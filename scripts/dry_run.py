"""The traced dry run behind ``scripts/estimate_memory.py``, and its measured twin.

``trace(cfg, world)``: the real ``Trainer`` of ``cfg`` (build -> standardization -> refills ->
steps -> checkpoint -> end of run) under ``FakeTensorMode``, one rank of a fake process group of
``world`` ranks simulated on this CPU, fake CUDA devices when the config trains on GPUs. Every
tensor is counted by ``tools/mem_trace.MemTracer``; the stand-ins for what needs values, files or
a network are ``trainer/dry_run.py``'s (listed in the result).

``measure(cfg)``: the same trainer for real (one rank of a torchrun launch), with the same phase
boundaries: each phase's peak RSS (``VmHWM``, reset at every boundary) and the bytes its
collectives send, counted at the ``torch.distributed`` calls (not at the dispatcher, where the
trace counts them). Comparing the two validates the trace on a CPU mesh.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_clt.data.buffer import REFILL_THREAD  # noqa: E402

GiB = 2**30
PHASES = ("build", "standardize", "refill", "step", "checkpoint", "export", "other")
"""``other``: what runs between the phases (the loop's logging, signal checks)."""

# Named cards: what torch.cuda reports as total memory (GiB). "Fits" means at most FIT_FRACTION of it.
GPUS = {
    "h100-80gb": {"name": "NVIDIA H100 80GB HBM3", "gib": 79.6},
    "h200": {"name": "NVIDIA H200", "gib": 139.8},
    "a100-80gb": {"name": "NVIDIA A100-SXM4-80GB", "gib": 79.2},
    "a100-40gb": {"name": "NVIDIA A100-SXM4-40GB", "gib": 39.4},
}
FIT_FRACTION = 0.9
# Not tensors, so not traced; added to the traced peaks. Device: the CUDA context, cuBLAS/cuDNN
# workspaces and the caching allocator's rounding (typ. 0.5-1 GiB on Hopper), and each NCCL
# communicator's buffers (NCCL_BUFFSIZE 4 MiB x 2 x up to 32 channels). Host: a CUDA PyTorch
# process before its first tensor (libraries, driver mappings).
CUDA_CONTEXT_GIB = 1.0
NCCL_GIB_PER_GROUP = 0.25
HOST_RUNTIME_CUDA_GIB = 3.0
# A gloo process group and its DTensor machinery, per CPU rank (measured before, 0.1 GiB).
CPU_GLOO_BYTES = int(0.1 * GiB)
# Transients of at least this size are attributed to where they were allocated (a stack walk each).
SITE_BYTES_GPU = 256 * 2**20
SITE_BYTES_CPU = 4 * 2**20


# -- phases -------------------------------------------------------------------------------------
@contextlib.contextmanager
def phase_hooks(enter: Callable[[str], Any], parts: dict[str, Any]) -> Iterator[None]:
    """The trainer's phases as ``enter(name)`` context managers around the functions that run them;
    ``parts`` collects the source, model and optimizers as they are built."""
    from torchtitan_clt import train
    from torchtitan_clt.checkpoint import manager
    from torchtitan_clt.data import buffer
    from torchtitan_clt.trainer import build, step

    targets = [
        (train.Trainer, "__init__", "build"),
        (build, "standardize", "standardize"),
        (buffer.ShuffleBuffer, "_next_refill", "refill"),
        (step.TrainStep, "__call__", "step"),
        (manager.CheckpointManager, "save", "checkpoint"),
        (train.Trainer, "_finish", "export"),
    ]
    saved = []
    for obj, name, phase in targets:
        orig = getattr(obj, name)

        def wrapped(*args: Any, _orig: Any = orig, _phase: str = phase, **kwargs: Any) -> Any:
            with enter(_phase):
                return _orig(*args, **kwargs)

        saved.append((obj, name, orig))
        setattr(obj, name, wrapped)

    def keep(
        key: str, fn: Callable[..., Any], pick: Callable[[Any], Any] = lambda r: r
    ) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            parts[key] = pick(out)
            return out

        return wrapped

    for obj, name, key, pick in (
        (build, "build_source", "source", lambda r: r),
        (build, "build_model", "model", lambda r: r[0]),
        (train, "build_optimizer", "optimizer", lambda r: r),
    ):
        orig = getattr(obj, name)
        saved.append((obj, name, orig))
        setattr(obj, name, keep(key, orig, pick))
    try:
        yield
    finally:
        for obj, name, orig in reversed(saved):
            setattr(obj, name, orig)


@contextlib.contextmanager
def inline_threads(prefix: str = "tclt") -> Iterator[None]:
    """The trainer's own background threads (the buffer's prefetch) run inline at ``start``:
    dispatch modes are per thread, so a traced refill must happen on the traced thread."""
    orig_start, orig_join = threading.Thread.start, threading.Thread.join

    def start(self: threading.Thread) -> None:
        if self.name.startswith(prefix):
            self._tclt_inline = True  # type: ignore[attr-defined]
            self.run()
            return
        orig_start(self)

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        if getattr(self, "_tclt_inline", False):
            return
        orig_join(self, timeout)

    threading.Thread.start, threading.Thread.join = start, join  # type: ignore[method-assign]
    try:
        yield
    finally:
        threading.Thread.start, threading.Thread.join = orig_start, orig_join  # type: ignore[method-assign]


def tensors_in(obj: Any, depth: int = 3, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``obj`` through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth <= 0 or isinstance(obj, (str, bytes, int, float, bool, torch.nn.Module)):
        return
    if isinstance(obj, dict):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return
    for v in items:
        yield from tensors_in(v, depth - 1, seen)


def holders(parts: dict[str, Any], staging: Any = None) -> dict[str, Callable[[], Iterable[torch.Tensor]]]:
    """What holds memory, by name, read from the trainer's parts."""

    def params() -> Iterable[torch.Tensor]:
        m = parts.get("model")
        return list(m.parameters()) if m is not None else []

    def buffers() -> Iterable[torch.Tensor]:
        m = parts.get("model")
        return list(m.buffers()) if m is not None else []

    def grads() -> Iterable[torch.Tensor]:
        m = parts.get("model")
        return [p.grad for p in m.parameters() if p.grad is not None] if m is not None else []

    def optim() -> Iterable[torch.Tensor]:
        o = parts.get("optimizer")
        return [
            t for opt in (o or []) for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
        ]

    def buf() -> Iterable[torch.Tensor]:
        s = parts.get("source")
        return list(tensors_in(getattr(s, "buffer", None), depth=4)) if s is not None else []

    def llm() -> Iterable[torch.Tensor]:
        s = parts.get("source")
        handle = getattr(s, "llm", None)
        if handle is None:
            return []
        return list(handle.model.parameters()) + list(handle.model.buffers())

    out = {
        "dictionary parameters": params,
        "dictionary buffers": buffers,
        "gradients": grads,
        "optimizer state": optim,
        "activation buffer": buf,
        "LLM weights": llm,
    }
    if staging is not None:
        out["checkpoint staging"] = lambda: list(staging.staged)
    return out


def _job_config_for_trace(cfg: Any, gpu: bool, steps: int, folder: str) -> Any:
    cfg = copy.deepcopy(cfg)
    cfg.kernels.backend = "torch"
    cfg.training.compile = False
    cfg.training.device = "cuda" if gpu else "cpu"
    cfg.training.steps = steps
    cfg.lr_scheduler.warmup_steps = 0  # the schedule holds no memory; a short trace must build it
    cfg.data.num_workers = 0
    cfg.job.dump_folder = folder
    cfg.profiling.enable_profiling = False
    cfg.profiling.enable_memory_snapshot = False
    return cfg


def _rows_per_refill(source: Any) -> int:
    buf = getattr(source, "buffer", None)
    for name in ("capacity", "rows"):
        v = getattr(buf, name, None)
        if isinstance(v, int) and v > 0:
            return v
    x = getattr(buf, "x", None)
    return int(x.shape[0]) if x is not None else 0


def trace(
    cfg: Any,
    world: int,
    gpu: str | None = None,
    steps: int = 2,
    rank: int = 0,
    gpus_per_node: int = 8,
) -> dict[str, Any]:
    """Run ``cfg``'s trainer on fake tensors as rank ``rank`` of ``world`` (see module docstring);
    ``gpu``: a name in ``GPUS`` (the config trains on CUDA), or None (it trains on this CPU)."""
    # what every run imports before its first tensor counts in the host baseline (measured here)
    import transformers.models.llama.modeling_llama  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes

    from torchtitan_clt import train
    from torchtitan_clt.data import pipeline  # noqa: F401
    from torchtitan_clt.distributed.parallel_dims import ParallelDims
    from torchtitan_clt.tools import fake_world as fw
    from torchtitan_clt.tools.mem_trace import MemTracer, watch_storage_resizes
    from torchtitan_clt.trainer import build
    from torchtitan_clt.trainer.dry_run import SUBSTITUTIONS, Expectations, patched, substitutions

    baseline = _rss_now() + (CPU_GLOO_BYTES if world > 1 and not gpu else 0)
    card = GPUS[gpu] if gpu else None
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank % gpus_per_node)}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    parts: dict[str, Any] = {}
    t0 = time.perf_counter()
    error = None
    with tempfile.TemporaryDirectory(prefix="tclt-trace-") as folder:
        jc = _job_config_for_trace(cfg, card is not None, steps, folder)
        oracle = Expectations(jc.model.k, jc.model.features_per_layer, jc.model.activation)
        tracer = MemTracer(
            values=oracle,
            fake_pinning=card is not None,
            meta_is_device=card is not None,
            site_bytes=SITE_BYTES_GPU if card is not None else SITE_BYTES_CPU,
        )
        real_build_mesh = ParallelDims.build_mesh

        def build_mesh(self: Any, device_type: str = "cpu") -> Any:
            with _disable_current_modes():  # the mesh's rank table needs real values
                return real_build_mesh(self, "meta" if card is not None else device_type)

        with contextlib.ExitStack() as stack:
            stack.enter_context(fake_world_for(world, rank))
            if card is not None:
                gpu_mode = fw.GpuOnMeta()
                stack.enter_context(
                    fw.pretend_cuda(gpus_per_node, int(card["gib"] * GiB), card["name"], tracer)
                )
                stack.enter_context(fw.track_meta_contexts())
                stack.enter_context(fw.gpu_semantics(gpu_mode))
                # the trainer's device is this rank's GPU, the meta device (tools/fake_world)
                stack.enter_context(patched(train, "device_from_config", lambda c: fw.GPU))
                import importlib

                for name in ("adam", "adamw", "optimizer"):
                    mod = importlib.import_module(f"torch.optim.{name}")
                    if hasattr(mod, "_device_dtype_check_for_fused"):  # fused AdamW on the GPU (meta)
                        stack.enter_context(
                            patched(mod, "_device_dtype_check_for_fused", lambda p, *a, **k: None)
                        )
                from torchtitan_clt.data import buffer as data_buffer
                from torchtitan_clt.data import cache as data_cache
                from torchtitan_clt.data import source as data_source
                from torchtitan_clt.trainer import nonfinite

                # pinned host buffers, side streams, the deferred finiteness check
                for mod in (data_buffer, data_cache, data_source, nonfinite):
                    if hasattr(mod, "on_gpu"):
                        gpu_like = lambda d: torch.device(d).type in ("cuda", "meta")  # noqa: E731
                        stack.enter_context(patched(mod, "on_gpu", gpu_like))
                from torch.distributed.fsdp._fully_shard import _fsdp_param_group, _fully_shard

                stack.enter_context(patched(_fully_shard, "_get_device_from_mesh", lambda mesh: fw.GPU))
                group_cls = _fsdp_param_group.FSDPParamGroup  # its parameters live on the meta GPU
                stack.enter_context(patched(group_cls, "_validate_no_meta_params", lambda self: None))
                real_autocast_dtype = build.autocast_dtype
                stack.enter_context(
                    patched(
                        build, "autocast_dtype", lambda c, d: real_autocast_dtype(c, torch.device("cuda"))
                    )
                )
            subs = stack.enter_context(substitutions(card is not None, oracle))
            tracer.holders = holders(parts, subs["staging"])
            stack.enter_context(phase_hooks(tracer.phase, parts))
            stack.enter_context(tracer.functional_collectives())
            stack.enter_context(inline_threads())
            stack.enter_context(watch_storage_resizes(tracer))
            stack.enter_context(patched(ParallelDims, "build_mesh", build_mesh))
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(fw.RealConstants())
            if card is not None:
                stack.enter_context(gpu_mode)
            stack.enter_context(tracer)
            try:
                trainer = train.Trainer(jc)
                trainer.train()
            except Exception as e:  # noqa: BLE001 - reported with the phases reached
                import traceback

                error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return summarize(
        tracer, jc, parts, subs, oracle, card, world, baseline, error, time.perf_counter() - t0, SUBSTITUTIONS
    )


@contextlib.contextmanager
def fake_world_for(world: int, rank: int) -> Iterator[None]:
    from torchtitan_clt.tools import fake_world as fw

    with fw.fake_process_group(world, rank), fw.movable_fake_modules():
        yield


def _groups(cfg: Any, world: int) -> int:
    """Communicators a rank uses: the world, and one per mesh dimension that has several ranks."""
    p = cfg.parallelism
    shard = p.dp_shard if p.dp_shard > 0 else world // max(1, p.dp_replicate * p.tp)
    return 1 + sum(1 for n in (p.dp_replicate, shard, p.tp) if n > 1)


def summarize(
    tracer: Any,
    cfg: Any,
    parts: dict[str, Any],
    subs: dict[str, Any],
    oracle: Any,
    card: dict | None,
    world: int,
    baseline: int,
    error: str | None,
    seconds: float,
    substituted: list[str],
) -> dict[str, Any]:
    dev_extra = (CUDA_CONTEXT_GIB + NCCL_GIB_PER_GROUP * _groups(cfg, world)) * GiB if card else 0
    host_base = HOST_RUNTIME_CUDA_GIB * GiB if card else baseline
    refill = tracer.phases.get("refill")
    # The trace runs a prefetched refill inline (dispatch modes are per thread); a real run extracts
    # it on its thread while steps go on, so a step's peak also holds the refill's transients.
    overlap = {"host": 0, "device": 0}
    if refill is not None and refill.entries and cfg.data.prefetch:
        overlap = dict(refill.transient)
    phases = {}
    for name in PHASES:
        st = tracer.phases.get(name)
        if st is None or (st.entries == 0 and name != "other"):
            continue
        extra = overlap if name == "step" else {"host": 0, "device": 0}
        phases[name] = {
            "device_peak_gib": round((st.peak["device"] + extra["device"] + dev_extra) / GiB, 3)
            if card
            else 0.0,
            "host_peak_gib": round((st.peak["host"] + extra["host"] + host_base) / GiB, 3),
            "device_tensors_gib": round(st.peak["device"] / GiB, 3),
            "host_tensors_gib": round(st.peak["host"] / GiB, 3),
            **(
                {"refill_in_flight_gib": {k: round(v / GiB, 3) for k, v in extra.items()}}
                if name == "step"
                else {}
            ),
            "device_rise_gib": round(st.rise["device"] / GiB, 3),
            "host_rise_gib": round(st.rise["host"] / GiB, 3),
            "entries": st.entries,
            "held_at_peak_gib": {
                kind: {k: round(v / GiB, 3) for k, v in sorted(b.items(), key=lambda kv: -kv[1]) if v}
                for kind, b in st.at_peak.items()
            },
            "held_at_peak_bytes": {kind: dict(b) for kind, b in st.at_peak.items()},
            "transients_at_peak_gib": {  # the large ones, by where they were allocated
                kind: {k: round(v / GiB, 3) for k, v in list(b.items())[:8]}
                for kind, b in st.transient_sites.items()
                if b
            },
            "collective_send_bytes": dict(st.collectives),
            "collective_calls": dict(st.collective_calls),
            "h2d_bytes": st.h2d_bytes,
            "d2h_bytes": st.d2h_bytes,
        }
    step = tracer.phases.get("step")
    source = parts.get("source")
    rows = _rows_per_refill(source) if source is not None else 0
    rows_per_step = cfg.training.batch_size  # rows every rank of a tp group reads, per dp rank below
    p = cfg.parallelism
    dp = world // max(1, p.tp)
    rows_per_step //= max(1, dp)
    per_step: dict[str, Any] = {"h2d_bytes": 0, "collective_send_bytes": 0, "collectives": {}}
    if step is not None and step.entries:
        n = step.entries
        coll = {k: v / n for k, v in step.collectives.items()}
        h2d = step.h2d_bytes / n
        if refill is not None and refill.entries and rows:
            share = rows_per_step / rows  # refills per step
            # The last refill: the steady state (the code layout's refills before its switch to y
            # columns, standardization's among them, move whole rows).
            for k, v in refill.last_collectives.items():
                coll[f"{k} (data, refill)"] = v * share
            h2d += refill.last_h2d_bytes * share
        per_step = {
            "h2d_bytes": int(h2d),
            "collective_send_bytes": int(sum(coll.values())),
            "collectives": {k: int(v) for k, v in coll.items()},
            "rows_per_refill": rows,
            "rows_per_step": rows_per_step,
        }
    fits = None
    if card is not None and phases:
        limit = card["gib"] * FIT_FRACTION
        fits = all(ph["device_peak_gib"] <= limit for ph in phases.values())
    return {
        "traced": error is None,
        "gpu": card["name"] if card else None,
        "gpu_gib": card["gib"] if card else None,
        "device_limit_gib": round(card["gib"] * FIT_FRACTION, 2) if card else None,
        "world_size": world,
        "phases": phases,
        "per_step": per_step,
        "fits": fits,
        "allowances_gib": {
            "device (CUDA context + NCCL communicators, not tensors)": round(dev_extra / GiB, 3),
            "host runtime (before any tensor)": round(host_base / GiB, 3),
        },
        "substituted": substituted,
        "value_reads_assumed": dict(oracle.unknown),
        "checkpoint_staged_gib": round(subs["staging"].staged_bytes / GiB, 3),
        "export_bytes": {"total": subs["writes"].bytes, "files": subs["writes"].files, "largest_file": subs["writes"].largest},
        "error": error,
        "seconds": round(seconds, 1),
    }  # fmt: skip


# -- measured twin ------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status_bytes("VmRSS")


def _hwm() -> int:
    return _status_bytes("VmHWM")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class RSSPhases:
    """Peak RSS per phase: the high-water mark is read and reset at every phase boundary, so each
    stretch of time counts for the phase that ran it (the innermost)."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = defaultdict(int)
        self.entries: dict[str, int] = defaultdict(int)
        self.stack = ["other"]
        _reset_hwm()

    def _cut(self) -> None:
        name = self.stack[-1]
        self.peak[name] = max(self.peak[name], _hwm())
        _reset_hwm()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._cut()
        self.stack.append(name)
        self.entries[name] += 1
        try:
            yield
        finally:
            self._cut()
            self.stack.pop()


class CollectiveCounter:
    """Bytes this rank sends through ``torch.distributed``'s Python calls and its functional
    collectives (DTensor's), by phase (ring formulas as in ``tools/mem_trace``), counted where the
    trainer calls them. A refill's collectives count for ``refill`` whichever thread runs them:
    the trace runs a prefetched refill inline, a real run on its own thread beside a step."""

    def __init__(self, phases: RSSPhases):
        self.phases = phases
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def _add(self, op: str, n: int) -> None:
        refill_thread = threading.current_thread().name == REFILL_THREAD
        self.bytes["refill" if refill_thread else self.phases.stack[-1]][op] += n

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import torch.distributed as dist

        from torchtitan_clt.tools.mem_trace import counted_once, functional_collectives_counted, ring_bytes

        def size(t: Any) -> int:
            return t.numel() * t.element_size()

        def w_of(group: Any) -> int:
            return dist.get_world_size(group)

        # name -> (kind, the argument whose bytes it sends): called by position or keyword, as
        # FSDP2 does (reduce_scatter_single(output=..., input=...))
        counters = {
            "all_reduce": ("all_reduce", "tensor"),
            "all_gather": ("all_gather", "tensor"),
            "all_gather_into_tensor": ("all_gather", "input_tensor"),
            "all_gather_single": ("all_gather", "input_tensor"),
            "reduce_scatter_tensor": ("reduce_scatter", "input"),
            "reduce_scatter_single": ("reduce_scatter", "input"),
            "broadcast": ("broadcast", "tensor"),
            # The root sends every other rank its part (y's columns under the code layout): W-1
            # parts of size(t); a rank is the root of 1/W of the chunks (the refills' deal), so
            # per chunk it sends (W-1)/W parts on average, whoever this trace makes the root.
            "scatter": ("scatter", "tensor"),
        }

        def counter(fn: Any, kind: str, arg: str) -> Callable[..., tuple[str, int]]:
            sig = inspect.signature(fn)

            def count(*args: Any, **kwargs: Any) -> tuple[str, int]:
                a = sig.bind(*args, **kwargs).arguments
                return kind, ring_bytes(kind, w_of(a.get("group")), size(a[arg]))

            return count

        saved = {}
        inside = threading.local()  # torch 2.13's all_gather_into_tensor calls all_gather_single
        for name, (kind, arg) in counters.items():
            orig = getattr(dist, name, None)
            if orig is None:  # e.g. the *_single names before torch 2.13
                continue
            saved[name] = orig
            setattr(dist, name, counted_once(orig, counter(orig, kind, arg), self._add, inside))
        try:
            with functional_collectives_counted(self._add):  # DTensor's, as the trace counts them
                yield
        finally:
            for name, orig in saved.items():
                setattr(dist, name, orig)


def measure(cfg: Any) -> dict[str, Any]:
    """Run ``cfg``'s trainer for real in this process (a torchrun rank, or alone): peak RSS and
    collective bytes per phase."""
    from torchtitan_clt.train import Trainer

    parts: dict[str, Any] = {}
    rss = RSSPhases()
    counter = CollectiveCounter(rss)
    baseline = _rss_now()
    # TCLT_MEASURE_TENSORS=1: also the tensors' live bytes per phase (this thread's, real values),
    # to tell a gap between trace and RSS made of tensors from one made of anything else.
    from torchtitan_clt.tools.mem_trace import MemTracer

    tensors = MemTracer(site_bytes=SITE_BYTES_CPU) if os.environ.get("TCLT_MEASURE_TENSORS") else None

    @contextlib.contextmanager
    def enter(name: str) -> Iterator[None]:
        with rss.phase(name), tensors.phase(name) if tensors is not None else contextlib.nullcontext():
            yield

    with phase_hooks(enter, parts), counter.installed(), tensors or contextlib.nullcontext():
        trainer = Trainer(cfg)
        trainer.train()
    rss._cut()
    rows = _rows_per_refill(parts.get("source"))
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "baseline_rss_gib": round(baseline / GiB, 3),
        "phases": {
            name: {
                "host_peak_gib": round(rss.peak[name] / GiB, 3),
                "entries": rss.entries.get(name, 0),
                "collective_send_bytes": dict(counter.bytes.get(name, {})),
            }
            for name in PHASES
            if name in rss.peak
        },
        "rows_per_refill": rows,
        **(
            {
                "tensors": {
                    name: {
                        "host_peak_gib": round(st.peak["host"] / GiB, 3),
                        "host_rise_gib": round(st.rise["host"] / GiB, 3),
                        "transients_at_peak_gib": {
                            k: round(v / GiB, 3)
                            for k, v in list(st.transient_sites.get("host", {}).items())[:8]
                        },
                    }
                    for name, st in tensors.phases.items()
                }
            }
            if tensors is not None
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """``--measure OUT [overrides]``: run the config for real as this torchrun rank and write its
    per-phase peak RSS and collective bytes to ``OUT/rank<R>.json`` (the trace's measured twin)."""
    import argparse
    import json

    from torchtitan_clt.config import load_config

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--measure", required=True, metavar="OUT")
    ns, overrides = ap.parse_known_args(argv)
    cfg = load_config(overrides)
    result = measure(cfg)
    out = Path(ns.measure)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
