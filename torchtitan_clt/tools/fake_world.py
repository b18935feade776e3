"""A world that does not exist: a fake process group of any size and fake CUDA devices on a CPU.

Together with ``FakeTensorMode`` (tensors with sizes, devices and dtypes but no memory) this runs
the real training code at shapes no machine here could hold, the way TorchTitan estimates memory:
one rank is simulated, its collectives complete at once (PyTorch's ``fake`` backend), and CUDA
tensors are fake ones on ``cuda:N`` without a driver. Nothing here computes a value; what reads
values (``.item()``, ``bool(t)``) goes through ``aten._local_scalar_dense``, which the caller's
dispatch mode answers (``tools/mem_trace.MemTracer.scalar``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

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
        self.device = torch.device("cuda", 0)

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


@contextlib.contextmanager
def pretend_cuda(
    gpus_per_node: int, total_memory: int, name: str = "fake GPU", tracer: Any = None
) -> Iterator[None]:
    """``torch.cuda`` answers as if ``gpus_per_node`` GPUs of ``total_memory`` bytes were there:
    streams and events order nothing, memory statistics come from ``tracer`` (a ``MemTracer``)
    when given. Reading a fake CUDA tensor's value (``.item()``, ``bool``, ``int``, ``float``,
    ``tolist``) dispatches ``aten._local_scalar_dense`` instead of entering a CUDA device guard
    (which a CPU build of torch cannot do); ``FakeCudaMode``, entered above ``FakeTensorMode``,
    does the rest."""
    cuda = torch.cuda
    props = types.SimpleNamespace(
        name=name, total_memory=total_memory, major=9, minor=0, multi_processor_count=132
    )
    allocated = (lambda *a, **k: tracer.current["device"]) if tracer is not None else (lambda *a, **k: 0)

    def peak(*a: Any, **k: Any) -> int:
        if tracer is None:
            return 0
        return max(st.peak["device"] for st in tracer.phases.values())

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

    T = torch.Tensor
    scalar = torch.ops.aten._local_scalar_dense.default

    def read(self: torch.Tensor) -> Any:
        return scalar(self)

    methods = {
        # a fake CPU tensor to the fake GPU: ``to`` with an explicit index takes no guard
        "cuda": lambda self, device=None, non_blocking=False, _o=T.cuda, **k: (
            self.to(torch.device("cuda", 0 if device is None else torch.device(device, 0).index or 0),
                    non_blocking=non_blocking) if _is_fake(self) else _o(self, device, non_blocking, **k)
        ),
        "is_cuda": property(lambda self, _o=T.is_cuda: self.device.type == "cuda" if _is_fake(self) else _o.__get__(self)),
        "record_stream": lambda self, stream, _o=T.record_stream: None if _is_fake(self) else _o(self, stream),
        "item": lambda self, _o=T.item: read(self) if _is_fake(self) else _o(self),
        "__bool__": lambda self, _o=T.__bool__: bool(read(self)) if _is_fake(self) else _o(self),
        "__int__": lambda self, _o=T.__int__: int(read(self)) if _is_fake(self) else _o(self),
        "__float__": lambda self, _o=T.__float__: float(read(self)) if _is_fake(self) else _o(self),
        "__index__": lambda self, _o=T.__index__: int(read(self)) if _is_fake(self) else _o(self),
        "tolist": lambda self, _o=T.tolist: _fake_tolist(self) if _is_fake(self) else _o(self),
    }
    F = torch.nn.functional
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # A fused kernel's footprint: the output alone, never the [T, T] scores (C++ would pick
        # its backend from the device it is told, meta, and fall back to the math path).
        if _is_fake(query) and query.device.type != "cpu":
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return real_sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    # torch.tensor(data, device="cuda") copies its data to the device before any mode sees it
    real_factories = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}

    def on_host_first(real: Any) -> Any:
        def make(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
            if device is not None and torch.device(device).type == "cuda":
                host = real(data, *args, **kwargs)
                dev = torch.device("cuda", torch.device(device).index or 0)
                return torch.empty(host.shape, dtype=host.dtype, device=dev).copy_(host)
            return real(data, *args, device=device, **kwargs)

        return make

    for k, real in real_factories.items():
        setattr(torch, k, on_host_first(real))
    saved_methods = {k: T.__dict__.get(k) for k in methods}
    for k, v in methods.items():
        setattr(T, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for k, real in real_factories.items():
            setattr(torch, k, real)
        for k, v in saved.items():
            setattr(cuda, k, v)
        for k, v in saved_methods.items():
            if v is None:
                delattr(T, k)
            else:
                setattr(T, k, v)


# Autocast's CUDA lists, as far as the trace needs them: ops that run in the lower precision, and
# ops that run in fp32 (torch/csrc/autograd/autocast_mode.cpp).
_LOWER = {
    "mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "linear", "mv", "addmv", "addr",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention",
}  # fmt: skip
_FP32 = {"pow", "norm", "linalg_vector_norm", "_softmax", "_log_softmax", "mse_loss", "layer_norm",
         "native_layer_norm", "cumsum", "exp", "log", "rsqrt"}  # fmt: skip


class FakeCudaMode(TorchDispatchMode):
    """Enter above ``FakeTensorMode`` inside ``pretend_cuda``. Torch's C++ asks a fake CUDA
    tensor for its device where it would take a CUDA device guard (indexing, autograd's input
    metadata, ``item``), which a CPU build cannot do: this mode tells C++ "meta" (a no-op guard)
    while Python and the fake ops keep seeing ``cuda``. Autocast decides from that same C++
    device, so it would not cast: the mode casts instead, by autocast's CUDA lists (matmuls in the
    autocast dtype, a parameter's cast kept while autocast is on, as autocast caches it;
    reductions and norms in fp32)."""

    def __init__(self, device: torch.device | str = "cuda:0") -> None:
        super().__init__()
        self.device = torch.device(device)
        self._cache: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            dev = func(*args)
            return torch.device("meta") if dev.type != "cpu" else dev
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "meta" and torch.get_default_device().type != "meta":
            # C++ made this from a fake CUDA tensor's options, which said "meta" (above)
            kwargs = {**kwargs, "device": self.device}
        if not torch.is_autocast_enabled("cuda"):
            if self._cache:
                self._cache.clear()
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name in _LOWER:
            dtype = torch.get_autocast_dtype("cuda")
            args = tuple(self._cast(a, dtype) for a in args)
        elif name in _FP32:
            args = tuple(self._cast(a, torch.float32, up=True) for a in args)
        return func(*args, **kwargs)

    def _cast(self, a: Any, dtype: torch.dtype, up: bool = False) -> Any:
        if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.dtype == dtype:
            return a
        if a.device.type == "cpu" or (up and a.dtype == torch.float64):
            return a
        if not up and a.dtype != torch.float32:
            return a
        if isinstance(a, torch.nn.Parameter) or (a.is_leaf and a.requires_grad):
            hit = self._cache.get(id(a))
            if hit is None:
                hit = self._cache[id(a)] = torch.ops.aten._to_copy.default(a, dtype=dtype)
            return hit
        return torch.ops.aten._to_copy.default(a, dtype=dtype)


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
    import weakref

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
