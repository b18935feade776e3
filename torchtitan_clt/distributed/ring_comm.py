"""FSDP2's all-gather and reduce-scatter as rings of point-to-point sends, for gloo.

Why: between processes on one host, gloo's own ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` are several times slower than an ``isend``/``irecv`` exchange of the
same bytes (measured in benchmarks/results/cpu_mesh_ring_2026-12-02.json). FSDP2 lets a module
swap its collectives (``set_custom_all_gather`` / ``set_custom_reduce_scatter``), so on gloo the
dictionary's parameters are gathered and its gradients reduced by the rings below; NCCL keeps its
native collectives.

Both rings move (w−1)/w of the buffer per rank, in w−1 steps of one chunk to the next rank and
one from the previous. The reduce-scatter accumulates in its input buffer (FSDP2's own
temporary, discarded after the call) and receives into ``_SCRATCH_PIECES`` pieces of scratch
kept per dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

try:  # torch >= 2.8: FSDP2's pluggable collectives
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError:  # pragma: no cover - older torch: FSDP2 keeps gloo's collectives
    AllGather = ReduceScatter = None  # type: ignore[assignment,misc]

# Messages above this are sent in pieces, so a large chunk is not one blocking transfer.
_PIECE_BYTES = 8 << 20


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> None:
    """Send ``send`` to global rank ``dst`` while receiving ``recv`` from ``src`` (1-D tensors)."""
    step = max(1, _PIECE_BYTES // send.element_size())
    works = []
    for lo in range(0, send.numel(), step):
        works.append(dist.isend(send[lo : lo + step], dst, group=group))
        works.append(dist.irecv(recv[lo : lo + step], src, group=group))
    for w in works:
        w.wait()


def _neighbours(group) -> tuple[int, int, int, int]:
    """(group rank, group size, global rank of the next, of the previous) in ``group``."""
    r, w = dist.get_rank(group), dist.get_world_size(group)
    ranks = list(range(w)) if group is None else dist.get_process_group_ranks(group)
    return r, w, ranks[(r + 1) % w], ranks[(r - 1) % w]


def ring_all_gather(output: torch.Tensor, input: torch.Tensor, group) -> None:
    """``output  # [w·n]`` ← every rank's ``input  # [n]`` in rank order (1-D, contiguous)."""
    r, w, nxt, prv = _neighbours(group)
    chunks = output.view(w, -1)
    if chunks[r].data_ptr() != input.data_ptr():
        chunks[r].copy_(input.view(-1))
    for i in range(1, w):  # step i: pass on the chunk received at step i−1
        _exchange(chunks[(r - i + 1) % w], nxt, chunks[(r - i) % w], prv, group)


# Receive buffers of the reduce-scatter, kept across calls: gloo receiving into freshly allocated
# memory page-faults as it copies (an exchange took twice as long as into touched memory).
_SCRATCH_PIECES = 4
_scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _scratch_pieces(like: torch.Tensor, numel: int) -> torch.Tensor:
    """``[_SCRATCH_PIECES, numel]`` receive buffers of ``like``'s dtype and device."""
    key = (like.dtype, like.device)
    buf = _scratch.get(key)
    if buf is None or buf.shape[1] < numel:
        buf = torch.zeros(_SCRATCH_PIECES, numel, dtype=like.dtype, device=like.device)
        _scratch[key] = buf
    return buf


def ring_reduce_scatter(output: torch.Tensor, input: torch.Tensor, group, average: bool) -> None:
    """``output  # [n]`` ← Σ (or mean) over ranks of chunk ``rank`` of ``input  # [w·n]``.

    ``input`` is overwritten with partial sums. Each step sends one chunk and receives the
    previous rank's in pieces, into the kept buffers in turn, adding each piece as it arrives
    while the next ones are in flight."""
    r, w, nxt, prv = _neighbours(group)
    chunks = input.view(w, -1)
    n = chunks.shape[1]
    step = max(1, min(n, _PIECE_BYTES // input.element_size()))
    bufs = _scratch_pieces(input, step)
    pieces = [(lo, min(step, n - lo)) for lo in range(0, n, step)]
    for i in range(w - 1):  # step i: send the partial sum of chunk r−i−1, add into chunk r−i−2
        send, acc = chunks[(r - i - 1) % w], chunks[(r - i - 2) % w]
        sends = [dist.isend(send[lo : lo + m], nxt, group=group) for lo, m in pieces]

        def post(j: int):
            return dist.irecv(bufs[j % _SCRATCH_PIECES, : pieces[j][1]], prv, group=group)

        recvs = [post(j) for j in range(min(_SCRATCH_PIECES, len(pieces)))]
        for j, (lo, m) in enumerate(pieces):
            recvs[j].wait()
            acc[lo : lo + m] += bufs[j % _SCRATCH_PIECES, :m]
            if j + _SCRATCH_PIECES < len(pieces):  # its buffer is free again
                recvs.append(post(j + _SCRATCH_PIECES))
        for work in sends:
            work.wait()
    if average:
        torch.div(chunks[r], w, out=output.view(-1))
    else:
        output.view(-1).copy_(chunks[r])


if AllGather is not None:

    class _Alloc:
        def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(*size, dtype=dtype, device=device)

    class RingAllGather(_Alloc, AllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
            ring_all_gather(output_tensor, input_tensor, group)
            return None  # done: FSDP2 waits only on a returned Work

    class RingReduceScatter(_Alloc, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
            if op == dist.ReduceOp.AVG:
                ring_reduce_scatter(output_tensor, input_tensor, group, average=True)
            elif op == dist.ReduceOp.SUM:
                ring_reduce_scatter(output_tensor, input_tensor, group, average=False)
            else:  # e.g. PREMUL_SUM from a gradient divide factor: gloo's own collective
                return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)
            return None


def use_ring_collectives(fsdp_module) -> bool:
    """Give ``fsdp_module`` (a ``fully_shard`` result) the ring collectives when the job runs on
    gloo and this torch lets FSDP2 swap them; True when it did. FSDP2 passes each call its own
    shard group, which the rings use."""
    if AllGather is None or not hasattr(fsdp_module, "set_custom_all_gather"):
        return False
    if dist.get_backend() != "gloo" or dist.get_world_size() < 2:
        return False
    fsdp_module.set_custom_all_gather(RingAllGather())
    fsdp_module.set_custom_reduce_scatter(RingReduceScatter())
    return True
