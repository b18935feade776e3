"""A world that does not exist: a fake process group of any size, and GPUs on a CPU-only machine.

Together with ``FakeTensorMode`` (tensors with sizes and dtypes but no memory) this runs the real
training code at shapes no machine here could hold, the way TorchTitan estimates memory: one rank
is simulated, and its collectives complete at once (PyTorch's ``fake`` backend).

The GPU is the ``meta`` device. A CPU build of torch cannot take a CUDA device guard, which its
C++ does for fake CUDA tensors too (indexing, autograd's input metadata, ``item``); the meta device
has a guard that does nothing, and fake tensors on it behave like a GPU's as far as sizes go.
``pretend_cuda`` makes ``torch.cuda`` answer as if GPUs were there (streams and events order
nothing), ``GpuOnMeta`` does what CUDA would do differently (autocast's casts, a fused attention's
footprint), and the caller gives the trainer ``meta`` as its device. Nothing here computes a value;
what reads values (``.item()``, ``bool(t)``) goes through ``aten._local_scalar_dense``, which the
caller's dispatch mode answers (``tools/mem_trace.MemTracer.values``).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

GPU = torch.device("meta")
"""The device that stands for this rank's GPU."""


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """``torch.distributed`` initialised with the ``fake`` backend: ``world_size`` ranks, this
    process being ``rank``; every collective returns at once without moving data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Stream:
    """A CUDA stream that orders nothing (fake tensors have no work to order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = GPU

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _Event()

    def query(self) -> bool:
        return True

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# > 0 while a ``with torch.device("meta")`` block makes tensors: the trainer builds its models so,
# and those hold no memory anywhere (unlike the meta tensors that stand for the GPU's)
_meta_context = [0]


def in_meta_context() -> bool:
    return _meta_context[0] > 0


@contextlib.contextmanager
def track_meta_contexts() -> Iterator[None]:
    """Count ``with torch.device("meta")`` blocks (``in_meta_context``)."""
    from torch.utils._device import DeviceContext

    real = DeviceContext.__torch_function__

    def torch_function(self: Any, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        meta = torch.device(self.device).type == "meta"
        _meta_context[0] += meta
        try:
            return real(self, func, types, args, kwargs)
        finally:
            _meta_context[0] -= meta

    DeviceContext.__torch_function__ = torch_function
    try:
        yield
    finally:
        DeviceContext.__torch_function__ = real


@contextlib.contextmanager
def pretend_cuda(
    gpus_per_node: int, total_memory: int, name: str = "fake GPU", tracer: Any = None
) -> Iterator[None]:
    """``torch.cuda`` answers as if ``gpus_per_node`` GPUs of ``total_memory`` bytes were there:
    streams and events order nothing, memory statistics come from ``tracer`` (a ``MemTracer``)
    when given; ``torch.meta`` is the device handle FSDP2 asks the mesh's device type for."""
    cuda = torch.cuda
    props = types.SimpleNamespace(
        name=name, total_memory=total_memory, major=9, minor=0, multi_processor_count=132
    )

    def allocated(*a: Any, **k: Any) -> int:
        return tracer.current["device"] if tracer is not None else 0

    def peak(*a: Any, **k: Any) -> int:
        return (
            max((st.peak["device"] for st in tracer.phases.values()), default=0) if tracer is not None else 0
        )

    patches: dict[str, Any] = {
        "is_available": lambda: True,
        "device_count": lambda: gpus_per_node,
        "set_device": lambda *a, **k: None,
        "current_device": lambda: 0,
        "get_device_capability": lambda *a, **k: (9, 0),
        "get_device_properties": lambda *a, **k: props,
        "get_device_name": lambda *a, **k: name,
        "is_bf16_supported": lambda *a, **k: True,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda *a, **k: None,
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda s=None: contextlib.nullcontext(s),
        "memory_allocated": allocated,
        "memory_reserved": allocated,
        "max_memory_allocated": peak,
        "max_memory_reserved": peak,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "mem_get_info": lambda *a, **k: (total_memory - allocated(), total_memory),
    }
    saved = {k: getattr(cuda, k) for k in patches if hasattr(cuda, k)}
    for k, v in patches.items():
        setattr(cuda, k, v)
    handle = types.SimpleNamespace(**{k: patches[k] for k in ("current_device", "device_count", "set_device", "Stream",
                                                                "Event", "current_stream", "synchronize", "stream")})  # fmt: skip
    had_meta = hasattr(torch, "meta")
    old_meta = getattr(torch, "meta", None)
    torch.meta = handle  # type: ignore[attr-defined]
    T = torch.Tensor
    real_record_stream = T.record_stream
    T.record_stream = lambda self, stream: None if _is_fake(self) else real_record_stream(self, stream)  # type: ignore[method-assign]
    real_tolist = T.tolist
    T.tolist = lambda self: _fake_tolist(self) if _is_fake(self) else real_tolist(self)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cuda, k, v)
        if had_meta:
            torch.meta = old_meta  # type: ignore[attr-defined]
        else:
            del torch.meta  # type: ignore[attr-defined]
        T.record_stream, T.tolist = real_record_stream, real_tolist  # type: ignore[method-assign]


# Autocast's CUDA lists, as far as the trace needs them (torch/csrc/autograd/autocast_mode.cpp):
# ops that run in the lower precision, and ops that run in fp32.
_LOWER = {
    "mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "linear", "mv", "addmv", "addr",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
}  # fmt: skip
_FP32 = {"pow", "norm", "linalg_vector_norm", "_softmax", "_log_softmax", "mse_loss", "native_layer_norm",
         "cumsum", "exp", "log", "rsqrt"}  # fmt: skip


class GpuOnMeta(TorchDispatchMode):
    """Enter above ``FakeTensorMode``: what CUDA does that the meta device would not.

    Autocast: ``torch.autocast("meta")`` does not exist, so the trainer's CUDA autocast becomes
    ``autocast(dtype)`` here (``autocast_for``), and this mode casts by autocast's CUDA lists
    (matmuls in the autocast dtype, a parameter's cast kept while autocast is on, as autocast
    caches it; reductions and norms in fp32). Attention: a fused kernel's footprint (its output,
    never the [T, T] scores the math fallback would make)."""

    def __init__(self) -> None:
        super().__init__()
        self.autocast: torch.dtype | None = None
        self._cache: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def autocast_for(self, dtype: torch.dtype | None, enabled: bool = True) -> Iterator[None]:
        old = self.autocast
        self.autocast = dtype if enabled else None
        try:
            yield
        finally:
            self.autocast = old
            if old is None:
                self._cache.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if self.autocast is not None:
            if name in _LOWER:
                args = tuple(self._cast(a, self.autocast) for a in args)
            elif name in _FP32:
                args = tuple(self._cast(a, torch.float32, up=True) for a in args)
        elif name in _LOWER:
            # backward of a cast matmul: autograd saved the fp32 inputs (the casts happened below
            # it), the incoming gradient is in the autocast dtype, as autocast's own backward has
            low = [
                a.dtype
                for a in args
                if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)
            ]
            if low:
                args = tuple(self._cast(a, low[0]) if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **kwargs)

    def _cast(self, a: Any, dtype: torch.dtype, up: bool = False) -> Any:
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == dtype:
            return a
        if (
            a.device.type == "cpu"
            or (not up and a.dtype != torch.float32)
            or (up and a.dtype == torch.float64)
        ):
            return a
        if self.autocast is not None and (
            isinstance(a, torch.nn.Parameter) or (a.is_leaf and a.requires_grad)
        ):
            hit = self._cache.get(id(a))
            if hit is None:
                hit = self._cache[id(a)] = torch.ops.aten._to_copy.default(a, dtype=dtype)
            return hit
        return torch.ops.aten._to_copy.default(a, dtype=dtype)


@contextlib.contextmanager
def gpu_semantics(mode: GpuOnMeta) -> Iterator[None]:
    """``torch.autocast("meta", ...)`` through ``mode`` (see ``GpuOnMeta``), and
    ``scaled_dot_product_attention`` on the GPU-standing meta tensors with a fused kernel's output."""
    real_autocast = torch.autocast

    class autocast(real_autocast):  # type: ignore[valid-type,misc]
        def __init__(
            self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, **kw: Any
        ):
            self._meta = device_type == "meta"
            if self._meta:
                self._ctx = mode.autocast_for(dtype or torch.bfloat16, enabled)
                return
            super().__init__(device_type, dtype=dtype, enabled=enabled, **kw)

        def __enter__(self) -> Any:
            return self._ctx.__enter__() if self._meta else super().__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return self._ctx.__exit__(*exc) if self._meta else super().__exit__(*exc)

    F = torch.nn.functional
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if query.device.type == "meta":
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return real_sdpa(query, key, value, *args, **kwargs)

    torch.autocast, F.scaled_dot_product_attention = autocast, sdpa
    try:
        yield
    finally:
        torch.autocast, F.scaled_dot_product_attention = real_autocast, real_sdpa


_known: dict[int, tuple[Any, list]] = {}


def remember_values(fake: torch.Tensor, values: torch.Tensor) -> None:
    """``fake`` holds ``values`` (a real tensor of its shape): read back by ``known_value``."""
    st = fake.untyped_storage()
    key = id(st)
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        flat = values.detach().flatten().tolist()
    _known[key] = (weakref.ref(st, lambda _r, k=key: _known.pop(k, None)), flat)


def known_value(t: torch.Tensor) -> Any:
    """The value of the one-element fake tensor ``t`` if its storage's values are known, else None."""
    if t.numel() != 1:
        return None
    entry = _known.get(id(t.untyped_storage()))
    if entry is None:
        return None
    flat = entry[1]
    off = t.storage_offset()
    return flat[off] if off < len(flat) else None


def _fake_tolist(t: torch.Tensor) -> Any:
    if t.dim() == 0:
        return torch.ops.aten._local_scalar_dense.default(t)
    return [_fake_tolist(t[i]) for i in range(t.shape[0])]


@contextlib.contextmanager
def movable_fake_modules() -> Iterator[None]:
    """``module.to(...)`` on fake parameters. A parameter made under ``FakeTensorMode`` carries
    the mode's own weak reference, and ``nn.Module._apply`` swaps fake parameters
    (``torch.utils.swap_tensors``), which refuses any tensor with a weak reference; for fake
    tensors that reference only memoizes a conversion, so it is not shown to the check."""
    import torch.utils as tu

    real = tu.weakref

    class _Shim(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def getweakrefs(obj: Any) -> list:
            return [] if _is_fake(obj) else weakref.getweakrefs(obj)

    tu.weakref = _Shim("weakref")
    try:
        yield
    finally:
        tu.weakref = real


class RealConstants(TorchDispatchMode):
    """Enter above ``FakeTensorMode``: an op whose tensor inputs are all real and small (a device
    mesh's rank table, a header of a few integers) runs for real, so code that reads such values
    (``mesh.reshape(...).tolist()``) gets them; a copy of such a tensor to the GPU stays readable
    (``known_value``); anything touching a fake tensor stays fake."""

    def __init__(self, max_numel: int = 1 << 16):
        super().__init__()
        self.max_numel = max_numel

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        from torch.utils._pytree import tree_flatten

        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        small = (
            bool(tensors)
            and not any(_is_fake(t) for t in tensors)
            and sum(t.numel() for t in tensors) <= self.max_numel
        )
        dev = kwargs.get("device")
        if small and dev is not None and torch.device(dev).type != "cpu":
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and func is torch.ops.aten._to_copy.default:
                remember_values(out, args[0])
            return out
        if small:
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():
                return func(*args, **kwargs)
        return func(*args, **kwargs)
