"""Count what a run holds and moves, op by op: live tensor bytes per device, peaks per phase, what
holds the peak, and the bytes each collective and host->device copy moves.

``MemTracer`` is a ``TorchDispatchMode``: every op's outputs are registered by storage (a storage
counts once however many views share it) and released when the storage dies. It works on real
tensors and on fake ones (``FakeTensorMode``: sizes without memory), which is how the dry run
(``scripts/estimate_memory.py``) traces a config's true shapes on a machine that could not
allocate them.

Bytes on the wire are what one rank sends per collective, for the algorithms NCCL and gloo use at
these sizes (ring): all-reduce of S bytes over W ranks 2(W-1)/W·S, all-gather (W-1)·s of an s-byte
input, reduce-scatter (W-1)/W·S of an S-byte input, all-to-all (W-1)/W·S, broadcast S (a pipelined
ring: every rank but the last forwards the whole message; the root sends it once), scatter
(W-1)/W·s of s-byte parts (the root sends W-1 parts, and the data path deals the root's role
evenly over the ranks).
"""

from __future__ import annotations

import contextlib
import sysconfig
import threading
import traceback
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

GIB = 2**30


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def device_kind(t: torch.Tensor, meta_is_device: bool = False) -> str | None:
    """``host`` for CPU tensors, ``device`` for accelerator ones; a meta tensor holds no memory
    (None) unless ``meta_is_device``: the dry run's GPU is the meta device
    (``tools/fake_world``), except inside ``with torch.device("meta")`` blocks."""
    kind = t.device.type
    if kind == "meta":
        from torchtitan_clt.tools.fake_world import in_meta_context

        return "device" if meta_is_device and not in_meta_context() else None
    return "host" if kind == "cpu" else "device"


@dataclass
class PhaseStats:
    """One phase of a run: its peaks, what held them, and what it moved."""

    peak: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    at_peak: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per kind, bytes by holder at (about) the peak; ``transients`` is what no holder claims."""
    collectives: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes this rank sent, by collective op."""
    collective_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    entries: int = 0
    """How many times the phase was entered (steps, refills...)."""
    rise: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    """The most one entry added above what was live when it began (what the phase itself needs)."""
    last_collectives: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes sent by collective op during the latest entry (the steady state where early entries
    differ, e.g. refills before and after the code layout's switch to y columns)."""
    last_h2d_bytes: int = 0
    transient: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    """The most one entry rose above what it left live at its end: what it needs only while it
    runs (a prefetched refill's extraction, which a real run overlaps with the step)."""
    transient_sites: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per kind, at the peak, the transients' large storages by where they were allocated
    (``file:line function``; with ``MemTracer(site_bytes=...)``)."""


def _group_size(args: Iterable[Any]) -> int:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a).size()
            except Exception:  # noqa: BLE001 - not a process group
                continue
    return 1


def _nbytes(ts: Iterable[Any] | torch.Tensor) -> int:
    # A lone tensor is one argument: iterating it would make a fake tensor per row (hours for FSDP's
    # flat all-gather buffers).
    flat, _ = tree_flatten([ts] if isinstance(ts, torch.Tensor) else list(ts))
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def ring_bytes(kind: str, w: int, s: int) -> int:
    """What one rank sends for an ``s``-byte input over ``w`` ranks (the module's formulas)."""
    if w <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (w - 1) * s // w
    if kind == "all_gather":
        return (w - 1) * s
    if kind == "broadcast":
        return s
    if kind in ("reduce_scatter", "scatter"):  # scatter: s-byte parts, the root's role dealt evenly
        return (w - 1) * s // w
    raise ValueError(f"no ring formula for {kind!r}")


def sent_bytes(func: Any, args: tuple, kwargs: dict) -> tuple[str, int] | None:
    """``(name, bytes this rank sends)`` of a c10d / functional collective op, else None."""
    ns = getattr(func, "namespace", "")
    if ns not in ("c10d", "_c10d_functional"):
        return None
    name = func._schema.name.split("::")[-1].rstrip("_")
    if name in ("wait_tensor", "barrier", "monitored_barrier"):
        return None
    if ns == "_c10d_functional":
        # (input, [op,] [group_size,] group_name)
        inp = args[0]
        s = _nbytes([inp])
        ints = [a for a in args[1:] if isinstance(a, int)]
        w = ints[0] if ints else 1
        # named as the c10d ops below, so a phase sums one kind whichever API issued it
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            if name.startswith(kind):
                return kind, ring_bytes(kind, w, s)
        if name.startswith("all_to_all"):
            return name, s  # upper bound: the split sizes are not known here
        if name.startswith("broadcast"):
            return name, s
        return name, s
    w = _group_size(args)
    if name.startswith("allreduce"):
        return "all_reduce", ring_bytes("all_reduce", w, _nbytes(args[0]))
    if name in ("allgather", "_allgather_base", "allgather_into_tensor_coalesced"):
        return "all_gather", ring_bytes("all_gather", w, _nbytes(args[1]))  # the inputs
    if name in ("reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced"):
        return "reduce_scatter", ring_bytes("reduce_scatter", w, _nbytes(args[1]))
    if name.startswith("broadcast"):
        return "broadcast", ring_bytes("broadcast", w, _nbytes(args[0]))
    if name.startswith("alltoall"):
        s = _nbytes(args[1])
        return "all_to_all", (w - 1) * s // w if w > 1 else 0
    if name in ("send",):
        return "send", _nbytes(args[0])
    if name == "scatter":
        return name, ring_bytes("scatter", w, _nbytes(args[0]))
    if name in ("gather", "reduce", "recv", "recv_any_source"):
        return name, _nbytes(args[0]) if name != "recv" else 0
    return name, 0


_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
}
_PIN_OPS = {torch.ops.aten._pin_memory.default}
# CPU reductions that first copy a bool / integer input into their accumulation dtype (measured:
# a sum of a [4096, 32768] bool mask rises the RSS by 1 GiB, int64, with no output to show for it);
# CUDA casts on the fly. Counted as a transient of the copy's size.
_PROMOTING_SUMS = {
    torch.ops.aten.sum.default,
    torch.ops.aten.sum.dim_IntList,
    torch.ops.aten.count_nonzero.default,
    torch.ops.aten.count_nonzero.dim_IntList,
}


def promotion_copy_bytes(func: Any, args: tuple, kwargs: dict) -> int:
    """Bytes a CPU reduction copies its input into before reducing (``_PROMOTING_SUMS``), else 0."""
    if func not in _PROMOTING_SUMS or not args or not isinstance(args[0], torch.Tensor):
        return 0
    t = args[0]
    if is_traceable_wrapper_subclass(t):  # a DTensor: its local shard is what the kernel copies
        t = getattr(t, "_local_tensor", None)
        if not isinstance(t, torch.Tensor):
            return 0
    if t.device.type != "cpu" or t.dtype.is_floating_point or t.dtype.is_complex:
        return 0
    acc = kwargs.get("dtype") or torch.int64
    itemsize = torch.empty((), dtype=acc).element_size() if acc != t.dtype else 0
    return t.numel() * itemsize


if hasattr(torch.ops.aten, "pin_memory"):
    _PIN_OPS.add(torch.ops.aten.pin_memory.default)


def _allocation_site() -> str:
    """The innermost three frames of the user's code (not torch's, not the standard library's)
    that made a storage."""
    frames = [
        f
        for f in traceback.extract_stack()
        if not f.filename.startswith(_LIBRARY_PATHS + ("<",)) and f.filename != __file__
    ]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:])) or "?"


_LIBRARY_PATHS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def counted_once(
    orig: Callable[..., Any],
    count: Callable[..., tuple[str, int]],
    add: Callable[[str, int], None],
    inside: threading.local,
) -> Callable[..., Any]:
    """``orig`` that first calls ``add(*count(*args, **kwargs))``, unless a counted call is already
    running on this thread (``inside.on``: a collective implemented by another one counts once). A
    call that cannot be counted is added as ``uncounted calls``; counting never breaks the call."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if getattr(inside, "on", False):
            return orig(*args, **kwargs)
        try:
            add(*count(*args, **kwargs))
        except Exception:  # noqa: BLE001 - counting must never break the call; it shows
            add("uncounted calls", 1)
        inside.on = True
        try:
            return orig(*args, **kwargs)
        finally:
            inside.on = False

    return wrapped


@contextlib.contextmanager
def functional_collectives_counted(add: Callable[[str, int], None]) -> Iterator[threading.local]:
    """``add(kind, bytes this rank sends)`` for each call of ``_functional_collectives``'
    all-reduce, all-gather and reduce-scatter (DTensor's path), by position or keyword, once per
    outermost call; yields a thread-local whose ``on`` is set while a counted call runs."""
    import inspect

    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    inside = threading.local()
    kinds = {
        "all_reduce": "all_reduce",
        "all_gather_tensor": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter",
    }
    saved = {}
    for name, kind in kinds.items():
        orig = getattr(funcol, name)
        sig = inspect.signature(orig)

        def count(*args: Any, _sig: Any = sig, _kind: str = kind, **kw: Any) -> tuple[str, int]:
            a = _sig.bind(*args, **kw).arguments  # the group: ranks, mesh, (mesh, dim) or a name
            w = c10d._resolve_process_group(funcol._resolve_group_name(a["group"])).size()
            return _kind, ring_bytes(_kind, w, _nbytes(a["self"]))

        saved[name] = orig
        setattr(funcol, name, counted_once(orig, count, add, inside))
    try:
        yield inside
    finally:
        for name, orig in saved.items():
            setattr(funcol, name, orig)


class MemTracer(TorchDispatchMode):
    """Live bytes per kind (``host`` / ``device``) from every op's outputs, peaks and traffic per phase.

    ``phase(name)`` attributes what happens inside it to ``name`` (the innermost phase wins; the
    outer one resumes after). ``holders``: name -> a callable returning the tensors it holds, read
    at each new peak to say what the peak is made of. ``values``: where tensors have no values
    (fake), answers what depends on them: ``values.scalar(t)`` for ``.item()``-style reads
    (``aten._local_scalar_dense``; None lets the op run) and ``values.count(t)`` for the rows of
    ``nonzero(t)``. ``fake_pinning``: fake tensors cannot be pinned; with it, ``pin_memory``
    becomes a plain copy (counted as host memory all the same). ``meta_is_device``: meta tensors
    stand for the GPU's (see ``device_kind``)."""

    def __init__(
        self,
        holders: dict[str, Callable[[], Iterable[torch.Tensor]]] | None = None,
        values: Any = None,
        fake_pinning: bool = False,
        snapshot_step: int = 64 * 2**20,
        meta_is_device: bool = False,
        site_bytes: int | None = None,
    ):
        super().__init__()
        self.site_bytes = site_bytes
        self.sites: dict[int, str] = {}  # id(storage) -> where a storage of >= site_bytes was made
        self.holders = dict(holders or {})
        self.values = values
        self.meta_is_device = meta_is_device
        self.fake_pinning = fake_pinning
        self.snapshot_step = snapshot_step
        self.live: dict[int, tuple[str, int, Any]] = {}  # id(storage) -> (kind, bytes, weakref)
        self.ignored: dict[int, Any] = {}
        self._reductions: dict[
            int, str
        ] = {}  # a one-element any() / all() result -> which  # storages that hold no memory (meta, not the GPU's)
        self.current = {"host": 0, "device": 0}
        self.phases: dict[str, PhaseStats] = {}
        self._stack: list[str] = ["other"]
        self._start: list[dict[str, int]] = [{"host": 0, "device": 0}]
        self._entry_rise: list[dict[str, int]] = [{"host": 0, "device": 0}]
        self._snap_at = {"host": 0, "device": 0}
        self._snap_phase: dict[str, str] = {}
        self._functional: Any = None  # ``functional_collectives_counted``'s flag, while counting there
        self.stats("other")

    # -- phases --------------------------------------------------------------------------------
    def add_sent(self, kind: str, n: int) -> None:
        st = self.stats(self.phase_name)
        st.collectives[kind] += n
        st.last_collectives[kind] += n
        st.collective_calls[kind] += 1

    @contextlib.contextmanager
    def functional_collectives(self) -> Iterator[None]:
        """Count DTensor's collectives at ``_functional_collectives``' Python calls: the ones a
        redistribution issues inside DTensor's dispatch reach no dispatch mode (a mode is off
        while its own ``__torch_dispatch__`` runs the op), so the dispatcher would miss them."""
        with functional_collectives_counted(self.add_sent) as inside:
            self._functional = inside  # its op, if this mode sees it, is the counted call
            try:
                yield
            finally:
                self._functional = None

    def stats(self, name: str) -> PhaseStats:
        if name not in self.phases:
            self.phases[name] = PhaseStats()
        return self.phases[name]

    @property
    def phase_name(self) -> str:
        return self._stack[-1]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        st = self.stats(name)
        st.entries += 1
        st.last_collectives, st.last_h2d_bytes = defaultdict(int), 0
        self._stack.append(name)
        self._start.append(dict(self.current))
        self._entry_rise.append({"host": 0, "device": 0})
        self._note_peak()
        try:
            yield st
        finally:
            start, rise = self._start[-1], self._entry_rise[-1]
            for kind, now in self.current.items():
                st.transient[kind] = max(st.transient[kind], rise[kind] - (now - start[kind]))
            self._stack.pop()
            self._start.pop()
            self._entry_rise.pop()
            self._note_peak()

    # -- storages ------------------------------------------------------------------------------
    def _register(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):
            # A DTensor: its local tensor, which ops run inside the subclass's dispatch (e.g. the
            # optimizer's zeros_like for its state) make out of this mode's sight.
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name, None)
                if isinstance(inner, torch.Tensor):
                    self._register(inner)
            return
        try:
            st = t.untyped_storage()
        except Exception:  # noqa: BLE001 - e.g. a sparse or nested tensor: not counted
            return
        key = id(st)
        if key in self.ignored:
            return
        n = st.nbytes()
        old = self.live.get(key)
        if old is not None:
            if old[1] == n:
                return
            self.current[old[0]] += n - old[1]  # resized in place (FSDP2 frees this way)
            self.live[key] = (old[0], n, old[2])
            return
        kind = device_kind(t, self.meta_is_device)
        if kind is None:
            if t.device.type == "meta":  # a model built on the meta device: never memory, also later
                self.ignored[key] = weakref.ref(st, lambda _r, k=key: self.ignored.pop(k, None))
            return
        ref = weakref.ref(st, lambda _r, k=key: self._free(k))
        self.live[key] = (kind, n, ref)
        if self.site_bytes is not None and n >= self.site_bytes:
            self.sites[key] = _allocation_site()
        self.current[kind] += n

    def _free(self, key: int) -> None:
        old = self.live.pop(key, None)
        self.sites.pop(key, None)
        if old is not None:
            self.current[old[0]] -= old[1]

    def resized(self, storage: Any) -> None:
        """A storage changed size outside the dispatcher (``UntypedStorage.resize_``)."""
        old = self.live.get(id(storage))
        if old is not None:
            n = storage.nbytes()
            self.current[old[0]] += n - old[1]
            self.live[id(storage)] = (old[0], n, old[2])
            self._note_peak()

    def _note_peak(self) -> None:
        st = self.stats(self.phase_name)
        start = self._start[-1]
        for kind, now in self.current.items():
            st.rise[kind] = max(st.rise[kind], now - start[kind])
            self._entry_rise[-1][kind] = max(self._entry_rise[-1][kind], now - start[kind])
            if now > st.peak[kind] and self._snap_phase.get(kind) != self.phase_name:
                self._snap_at[kind] = 0  # a new phase: its first peak gets its own breakdown
                self._snap_phase[kind] = self.phase_name
            if now > st.peak[kind]:
                st.peak[kind] = now
                step = min(self.snapshot_step, max(4096, now // 100))  # within 1% of the peak
                if now >= self._snap_at[kind] + step or kind not in st.at_peak:
                    st.at_peak[kind] = self.breakdown(kind, st.transient_sites)
                    self._snap_at[kind] = now
                elif now > sum(st.at_peak[kind].values()):
                    st.at_peak[kind]["transients"] += now - sum(st.at_peak[kind].values())

    def breakdown(self, kind: str, sites: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
        """Bytes of ``kind`` by holder now; what no holder claims is ``transients`` (its large
        storages by allocation site into ``sites[kind]`` when given)."""
        out: dict[str, int] = {}
        claimed: set[int] = set()
        with torch.utils._python_dispatch._disable_current_modes():
            for name, fn in self.holders.items():
                n = 0
                try:
                    tensors = list(fn())
                except Exception:  # noqa: BLE001 - a holder that is not built yet
                    tensors = []
                for t in tensors:
                    if t is None:
                        continue
                    t = getattr(t, "_local_tensor", t)  # a DTensor's own shard
                    try:
                        key = id(t.untyped_storage())
                    except Exception:  # noqa: BLE001
                        continue
                    entry = self.live.get(key)
                    if entry is None or entry[0] != kind or key in claimed:
                        continue
                    claimed.add(key)
                    n += entry[1]
                if n:
                    out[name] = n
        out["transients"] = self.current[kind] - sum(out.values())
        if sites is not None and self.site_bytes is not None:
            by_site: dict[str, int] = defaultdict(int)
            for key, where in self.sites.items():
                entry = self.live.get(key)
                if entry is not None and entry[0] == kind and key not in claimed:
                    by_site[where] += entry[1]
            sites[kind] = dict(sorted(by_site.items(), key=lambda kv: -kv[1]))
        return out

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            self.values is not None
            and args
            and isinstance(args[0], torch.Tensor)
            and (_is_fake(args[0]) or args[0].device.type == "meta")
        ):
            if func is torch.ops.aten._local_scalar_dense.default:
                made_by = self._reductions.get(id(args[0].untyped_storage()))
                if made_by is not None:  # "is any entry bad?" no; "are all entries fine?" yes
                    return made_by == "all"
                value = self.values.scalar(args[0])
                if value is not None:
                    return value
            elif func is torch.ops.aten.nonzero.default:
                t = args[0]
                out = torch.empty((self.values.count(t), t.dim()), dtype=torch.long, device=t.device)
                self._register(out)
                self._note_peak()
                return out
            elif func in _INDEX_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
            ):
                # a boolean mask index is a nonzero of the mask: its size is the oracle's
                indices = []
                for i in args[1]:
                    if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                        n = self.values.count(i)
                        indices += [torch.empty((n,), dtype=torch.long, device=i.device)] * i.dim()
                    else:
                        indices.append(i)
                args = (args[0], indices, *args[2:])
            elif func is torch.ops.aten.bincount.default:
                # the ids are below minlength wherever this code calls it with one
                t, minlength = args[0], (list(args[2:3]) or [kwargs.get("minlength", 0)])[0]
                dtype = torch.long if (len(args) < 2 or args[1] is None) else args[1].dtype
                out = torch.zeros((minlength,), dtype=dtype, device=t.device)
                self._register(out)
                self._note_peak()
                return out
        if self.fake_pinning:
            if func in _PIN_OPS:
                func, args, kwargs = torch.ops.aten.clone.default, (args[0],), {}
            elif kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        counted = self._functional is not None and getattr(self._functional, "on", False)
        sent = None if counted else sent_bytes(func, args, kwargs)
        st = self.stats(self.phase_name)
        if sent is not None:
            self.add_sent(*sent)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_dev = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if isinstance(src, torch.Tensor) and dst_dev is not None:
                dst_dev = torch.device(dst_dev)
                n = src.numel() * src.element_size()  # a cross-device copy moves the source's dtype
                if src.device.type == "cpu" and dst_dev.type != "cpu":
                    st.h2d_bytes += n
                    st.last_h2d_bytes += n
                elif src.device.type != "cpu" and dst_dev.type == "cpu":
                    st.d2h_bytes += n
        promo = promotion_copy_bytes(func, args, kwargs)
        if promo:  # the kernel's own copy, freed before it returns
            self.current["host"] += promo
            self._note_peak()
            self.current["host"] -= promo
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.any, torch.ops.aten.all) and isinstance(out, torch.Tensor):
            if out.numel() == 1 and _is_fake(out):
                st_ = out.untyped_storage()
                key_ = id(st_)
                self._reductions[key_] = func.overloadpacket.__name__
                weakref.finalize(st_, self._reductions.pop, key_, None)
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._register(t)
        # in-place ops on views may grow nothing, but an op can also resize its input storage
        if func._schema.is_mutable:
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor):
                    self._register(a)
        self._note_peak()
        return out


@contextlib.contextmanager
def watch_storage_resizes(tracer: MemTracer) -> Iterator[None]:
    """Tell ``tracer`` about ``UntypedStorage.resize_`` (FSDP2 frees and refills its unsharded
    parameters that way, outside the dispatcher)."""
    cls = torch.UntypedStorage
    orig = cls.resize_

    def resize_(self, size):
        out = orig(self, size)
        tracer.resized(self)
        return out

    cls.resize_ = resize_
    try:
        yield
    finally:
        cls.resize_ = orig
