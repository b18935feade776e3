"""Small builders shared by the unit tests (``from helpers import tiny_args, tiny_model``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from torchtitan_clt.protocols.transcoder import TranscoderArgs

MOLT_EXTRA = {"molt_ranks": [3, 2, 1], "molt_counts": [2, 3, 4]}  # F = 9
MATRYOSHKA_EXTRA = {"matryoshka_prefixes": [2, 4]}


def tiny_args(
    family: str = "clt",
    act: str = "relu",
    L: int = 3,
    d: int = 4,
    F: int = 6,
    d_in: int | None = None,
    d_out: int | None = None,
    extra: dict[str, Any] | None = None,
    **kw: Any,
) -> TranscoderArgs:
    """A valid tiny ``TranscoderArgs`` of any family: an SAE reads and writes ``resid_post``, a MOLT
    gets ranks/counts (F is their count sum), a Matryoshka CLT prefixes 2 and 4."""
    if family == "molt":
        extra = extra or MOLT_EXTRA
        F = sum(extra["molt_counts"])
    elif family == "matryoshka_clt":
        extra = extra or MATRYOSHKA_EXTRA
    hooks = {"hook_in": "resid_post", "hook_out": "resid_post"} if family == "sae" else {}
    return TranscoderArgs(
        family=family,
        n_layers=L,
        d_in=d if d_in is None else d_in,
        d_out=d if d_out is None else d_out,
        features_per_layer=F,
        activation=act,
        k=2,
        jumprelu_threshold_init=0.05,
        extra=extra or {},
        **hooks,
        **kw,
    )


def tiny_model(*args: Any, seed: int = 0, **kw: Any):
    """``tiny_args(...)`` built through the registry and initialized with ``seed``."""
    from torchtitan_clt.protocols import model_registry

    a = tiny_args(*args, **kw)
    m = model_registry.get(a.family).build_fn(a)
    m.init_weights(seed)
    return m


def load_reference_(model: Any, ref: Any) -> None:
    """Copy a one-process ``ref``'s whole state into the (sharded) ``model``: each parameter's
    shard of the full tensor, the buffers whole."""
    from torchtitan_clt.models.common import copy_full_

    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in ref.state_dict().items():
            if name in params:
                copy_full_(params[name], p)
            else:
                model.get_buffer(name).copy_(p)


class CountingLoader:
    """Batches of consecutive row ids; stateful like a StatefulDataLoader (shuffle-buffer tests)."""

    def __init__(self, rows_per_batch: int = 5):
        self.rows, self.next_id = rows_per_batch, 0

    def __iter__(self):
        import torch

        while True:
            ids = torch.arange(self.next_id, self.next_id + self.rows)
            self.next_id += self.rows
            yield ids

    def state_dict(self):
        return {"next_id": self.next_id}

    def load_state_dict(self, sd):
        self.next_id = sd["next_id"]


def id_rows(ids):
    """An "extraction" whose x carries each row's id and y its negation: rows stay paired."""
    x = ids.float()[:, None, None].expand(-1, 2, 3).clone()
    return x, -x


def fsdp_toy_weights(rank: int, world: int, mode: str, steps: int = 3) -> tuple[list, dict]:
    """A two-layer ``fully_shard`` model over ``world`` gloo ranks trained ``steps`` SGD steps with
    FSDP2's collectives ``mode`` (``native``, ``ring``, ``shm``): (whole weights, calls counted by
    ``CommTimer``). Runs inside an initialized process group."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torchtitan_clt.distributed import ring_comm, shm_comm
    from torchtitan_clt.tools.comm_timer import CommTimer

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12 * world), torch.nn.Linear(12 * world, 4))
    fully_shard(model, mesh=mesh)
    if mode == "shm":
        assert shm_comm.use_shared_memory_collectives(model, mesh.get_group(0), rings=True)
    elif mode == "ring":
        assert ring_comm.use_ring_collectives(model)
    with CommTimer() as timer:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(10 + rank))
        for _ in range(steps):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return [p.full_tensor().detach().clone() for p in model.parameters()], dict(timer.calls)


def tagged_extract(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in extractor whose rows name their origin: row ``(b, t)``, t >= 1, has
    ``x[.., 0, :T]`` = the window's tokens and ``x[.., 0, T]`` = t (2 layers of 64); y = -x."""
    B, T = tokens.shape
    x = torch.zeros(B, T - 1, 2, 64)
    x[:, :, 0, :T] = tokens[:, None, :].float()
    x[:, :, 0, T] = torch.arange(1, T).float()
    x = x.reshape(B * (T - 1), 2, 64)
    return x, -x


def free_port() -> int:
    """A free TCP port on this host, for a gloo group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """Set the environment torchrun gives rank ``rank`` of ``world`` (a ``run_ranks`` worker that
    builds a Trainer, which initializes the process group from it)."""
    import os

    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def run_ranks(fn, args: tuple, nprocs: int, timeout_s: float = 300.0, start_method: str = "spawn") -> None:
    """``fn(rank, *args)`` on ``nprocs`` processes (ranks of a gloo group the worker sets up).

    Spawned by default: a child forked from a pytest process whose other threads hold a lock can
    hang (one did, on a fresh clone). ``start_method="fork"`` is for workers that need what the
    test built in this process (a loaded LLM). A rank that fails fails the test with its traceback;
    ranks still running after ``timeout_s`` are killed and the test fails instead of stalling."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(
                f"{nprocs} ranks of {fn.__name__} still running after {timeout_s:.0f} s (a deadlock?)"
            )


class HostSyncs:
    """``calls``: host reads of tensor values by kind (``count_host_syncs``)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def add(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1


@contextlib.contextmanager
def count_host_syncs():
    """Every read of a tensor's values by the host inside the block (on CUDA each waits for the
    device): ``item`` / ``bool`` / ``int`` / ``float`` (``aten._local_scalar_dense``),
    ``nonzero``, ``tolist`` and ``torch.cuda.synchronize``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = HostSyncs()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "nonzero"):
                seen.add(name)
            return func(*args, **(kwargs or {}))

    tolist, synchronize = torch.Tensor.tolist, torch.cuda.synchronize

    def counted_tolist(t):
        seen.add("tolist")
        return tolist(t)

    def counted_synchronize(*a, **k):
        seen.add("cuda.synchronize")
        return synchronize(*a, **k)

    torch.Tensor.tolist, torch.cuda.synchronize = counted_tolist, counted_synchronize
    try:
        with Mode():
            yield seen
    finally:
        torch.Tensor.tolist, torch.cuda.synchronize = tolist, synchronize
