"""FSDP2's all-gather and reduce-scatter through shared memory, for gloo ranks on one host.

Why: gloo moves every byte through loopback TCP even between processes on one machine; in a
dp_shard=2 CPU step that was a third of the step (benchmarks/results/cpu_mesh_L6_session8_*).
FSDP2 asks its pluggable collectives to allocate the buffers it then fills (``allocate``), so
the all-gather's output and the reduce-scatter's input can be handed out inside one ``/dev/shm``
segment per FSDP unit, mapped by every rank of the shard group (``[w, n]``: the gather is row 0,
rank r's reduce input row r). A rank's copy-in then writes straight into
memory its peers read: the all-gather is a barrier, the reduce-scatter a barrier and a w-way
sum of this rank's chunk. No byte crosses a socket.

Safety:
- A segment is used only when every rank reads rank 0's random nonce through it (one host, one
  ``/dev/shm``), and its space is reserved with ``posix_fallocate`` first (writing past a full
  tmpfs kills the process with SIGBUS). Otherwise the collective falls back (the rings).
- The file is unlinked as soon as every rank has mapped it: nothing is left behind by a crash.
- Every ``allocate`` starts with a barrier, so no rank refills a segment while a peer still
  reads the previous call's data.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from torchtitan_clt.distributed import ring_comm
from torchtitan_clt.tools.logging import logger

SHM_DIR = "/dev/shm"

try:  # torch >= 2.8: FSDP2's pluggable collectives
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError:  # pragma: no cover - older torch: FSDP2 keeps gloo's collectives
    AllGather = ReduceScatter = None  # type: ignore[assignment,misc]


def _reserve(fd: int, nbytes: int) -> None:
    os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now rather than SIGBUS at the first write


def _visible(name: str) -> bool:
    return os.path.exists(name)


def open_segment(group, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``[numel]`` of ``dtype`` mapped by every rank of ``group``, or None (on every rank) when
    they do not share one ``/dev/shm`` or it has no room. Collective over ``group``."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    rank, src = dist.get_rank(group), dist.get_global_rank(group, 0) if group is not None else 0
    seg, meta, why = None, [None, 0], f"no {SHM_DIR}"
    if rank == 0 and os.path.isdir(SHM_DIR):
        name = os.path.join(SHM_DIR, f"torchtitan_clt_{os.getpid()}_{uuid.uuid4().hex}")
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _reserve(fd, max(nbytes, 8))
            finally:
                os.close(fd)
            seg = torch.from_file(name, shared=True, size=numel, dtype=dtype)
            nonce = int.from_bytes(os.urandom(7), "little") + 1
            seg.view(torch.uint8)[:8].copy_(torch.tensor([nonce], dtype=torch.int64).view(torch.uint8))
            meta = [name, nonce]
        except (OSError, RuntimeError) as e:  # no room (ENOSPC) or no tmpfs: every rank falls back
            seg, why = None, f"{SHM_DIR} has no room for {nbytes / 2**30:.2f} GiB ({e})"
            if os.path.exists(name):
                os.unlink(name)
    dist.broadcast_object_list(meta, src=src, group=group)
    name, nonce = meta
    if rank != 0 and name is not None and _visible(name):  # never create it here
        try:
            seg = torch.from_file(name, shared=True, size=numel, dtype=dtype)
        except RuntimeError:
            seg = None
    seen = seg is not None and int(seg.view(torch.uint8)[:8].view(torch.int64)[0]) == nonce
    ok = torch.tensor([1 if seen else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # also: every rank has mapped it
    if rank == 0 and name is not None:
        os.unlink(name)  # the mappings keep the memory; the name is not needed any more
    shared = bool(ok.item())
    if rank == 0:
        if shared:
            logger.info(
                f"FSDP2 all-gather / reduce-scatter through a {nbytes / 2**20:.1f} MiB {SHM_DIR} segment "
                f"shared by ranks {dist.get_process_group_ranks(group)}"
            )
        else:
            why = why if name is None else "not every rank sees the segment (ranks on several hosts?)"
            logger.warning(f"FSDP2 collectives over gloo's transport: {why}")
    return seg if shared else None


class _Shared:
    """One FSDP unit's segment ``[w, n]``, opened on first use (again if ``n`` changes) and used
    by both of its collectives: the all-gather output is row 0, rank r's reduce-scatter input row
    r. The two never overlap in time (a unit's gather is copied out before its backward reduces),
    and every ``row`` call starts with a barrier, so a row is refilled only once every rank is done
    with what it held. ``failed``: the segment could not be opened; the fallback runs from then on."""

    def __init__(self, group) -> None:
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self.world = len(self.ranks)
        self.rank = dist.get_rank(group)
        self.seg: torch.Tensor | None = None
        self.failed = False

    def row(self, row: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if self.failed or device.type != "cpu":
            return None
        if self.seg is None or self.seg.shape[1] != numel or self.seg.dtype != dtype:
            self.seg = None  # drop the old mapping before a second one exists
            seg = open_segment(self.group, self.world * numel, dtype)
            self.failed = seg is None
            if self.failed:
                return None
            self.seg = seg.view(self.world, numel)
        dist.barrier(group=self.group)  # every peer is done with the previous call's data
        return self.seg[row]

    def holds(self, t: torch.Tensor, group) -> bool:
        """``t`` lies in this segment and ``group`` is the one it was opened over."""
        if self.seg is None or (
            group is not self.group and dist.get_process_group_ranks(group) != self.ranks
        ):
            return False
        lo = self.seg.data_ptr()
        return lo <= t.data_ptr() < lo + self.seg.numel() * self.seg.element_size()


if AllGather is not None:

    class ShmAllGather(AllGather):
        """The gathered buffer is row 0 of the segment, shared by the group: each rank's copy-in
        writes its own chunk into it, so after one barrier every rank holds every chunk."""

        def __init__(self, shared: _Shared, fallback: Callable) -> None:
            self.shared = shared
            self.fallback = fallback

        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            buf = self.shared.row(0, math.prod(size), dtype, device)
            return buf.view(*size) if buf is not None else torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
            if self.shared.holds(output_tensor, group):
                dist.barrier(group=self.shared.group)  # every rank's chunk is in
                return None
            return self.fallback(output_tensor, input_tensor, group)

    class ShmReduceScatter(ReduceScatter):
        """Rank r's reduce-scatter input is row r of the segment; after one barrier rank r sums
        chunk r of every row into its own output. FSDP2 allocates the input (w·n) and then the
        output (n): the first goes to the segment, the second is private."""

        def __init__(self, shared: _Shared, fallback: Callable) -> None:
            self.shared = shared
            self.fallback = fallback
            self._output_numel: int | None = None  # set between the input's and output's allocate

        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            numel = math.prod(size)
            if self._output_numel == numel:  # the output that follows an input
                self._output_numel = None
                return torch.empty(*size, dtype=dtype, device=device)
            buf = self.shared.row(self.shared.rank, numel, dtype, device)
            if buf is None:
                return torch.empty(*size, dtype=dtype, device=device)
            self._output_numel = numel // self.shared.world
            return buf.view(*size)

        def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
            self._output_numel = None
            if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) or not self.shared.holds(input_tensor, group):
                return self.fallback(output_tensor, input_tensor, group, op)
            w, r = self.shared.world, self.shared.rank
            dist.barrier(group=self.shared.group)  # every rank's input is in
            rows = self.shared.seg.view(w, w, -1)[:, r]  # [w, n]: chunk r of every rank's input
            out = output_tensor.view(-1)
            torch.add(rows[0], rows[1], out=out)  # w >= 2: use_shared_memory_collectives
            for q in range(2, w):
                out.add_(rows[q])
            if op == dist.ReduceOp.AVG:
                out.div_(w)
            return None


def _gloo_all_gather(output, input, group):
    return dist.all_gather_into_tensor(output, input, group=group)


def _gloo_reduce_scatter(output, input, group, op):
    return dist.reduce_scatter_tensor(output, input, op=op, group=group)


def use_shared_memory_collectives(fsdp_module, shard_group, rings: bool = True) -> bool:
    """Give ``fsdp_module`` (a ``fully_shard`` result over ``shard_group``) the shared-memory
    collectives when the job runs on gloo with 2+ ranks and this torch lets FSDP2 swap them;
    ``rings``: what runs where a segment cannot be used (the rings, or gloo's own)."""
    if AllGather is None or not hasattr(fsdp_module, "set_custom_all_gather"):
        return False
    if dist.get_backend() != "gloo" or dist.get_world_size(shard_group) < 2:
        return False
    shared = _Shared(shard_group)
    gather = ring_comm.RingAllGather() if rings else _gloo_all_gather
    reduce = ring_comm.RingReduceScatter() if rings else _gloo_reduce_scatter
    fsdp_module.set_custom_all_gather(ShmAllGather(shared, gather))
    fsdp_module.set_custom_reduce_scatter(ShmReduceScatter(shared, reduce))
    return True
