"""Shuffle buffer: full refill, shuffle, drain (``passes`` times), so that resume is exact.

A refill is a sequence of *chunks*, each one extraction batch (``extract(next(loader))``), taken
until ``buffer_tokens`` rows are held: the capacity is ``buffer_tokens`` rounded up to one chunk.
Each pass draws a permutation from a seeded CPU generator and serves rows in that order; a batch
may span two passes or two refills. No row outlives its refill, so the state is small: the loader's
state at the start of the refill being drained, the generator state before the current pass's
permutation, the pass index and the read position. ``load_state_dict`` + the next ``next_batch``
replays that refill (one extra extraction) and continues with exactly the rows an uninterrupted
run would have served.

Tensor parallelism (``share``, a ``ChunkShare``): the ranks of a group hold the same buffer, but
each chunk is extracted by one rank only, from its own loader, and broadcast by it to the group
straight into the buffer's slot, at most ``piece_bytes`` of x (and of y) at a time, so no rank
ever holds more than its own extraction plus one piece of gathered rows. Chunks are dealt
round-robin: chunk ``c`` of a refill belongs to rank ``(first + c) % tp``, where ``first`` counts
the chunks taken from the own loaders since they started, mod tp (so every rank extracts its share over
time, and a rank whose turn it is not does not read its loader). The owners of a refill's chunks
extract them at the same time (a rank extracts its next chunk before the one in flight arrives),
and the broadcasts follow in chunk order. The capacity is the same as without tensor
parallelism. The deal of the refill being drained (``first``) is part of the state, so a replay
deals it again the same way.

Resume on another number of ranks (``adopt``): every old rank was partway through a refill. The
new ranks first finish those refills (each is replayed by the ``replay`` callback from its old
ranks' loader states, then served from the saved permutation, pass and position on), and only then
read their own loader, which the caller has set to where the old refills ended (``loader_end`` in
the state). So no row is skipped or served twice. Under tensor parallelism an adopted refill's
chunks are dealt from rank 0 (``replay`` is told which ones are this rank's); they give the same
rows in the same order whichever rank extracts them. Adopted refills waiting to be drained are part
of the state (``queue``), so a resumed run can itself be saved and resumed.

Prefetch (double buffering): while one refill is drained, a background thread extracts the next
one into a second pair of tensors (torch ops release the GIL; on CUDA the thread works on its own
stream). The rows, their order and the saved state are the same as without prefetch: the next
refill only starts earlier, and a resume recomputes it. It costs a second buffer's memory. Under
tensor parallelism the broadcasts run on the thread too, over a process group of their own (see
``ChunkShare``), so they never interleave with the training thread's collectives.

A buffer on the host feeding a CUDA device is pinned (``pin_memory``): ``next_batch(B, device)``
gathers the batch into one of two pinned staging tensors and copies it asynchronously, so the copy
overlaps the step.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.config.manager import ConfigError

Extract = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
# replay(origin, (rank, size)) -> (the batches of the chunks c with c % size == rank, extract)
Replay = Callable[[Any, tuple[int, int]], tuple[Any, Extract]]

PIECE_BYTES = 256 * 2**20
"""Most bytes of x (and of y) one broadcast of a chunk carries: what a receiving rank holds of
gathered rows outside its buffer (at clt_8b, 1,024 rows of 32 layers × 4096 in bf16)."""

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FAILED = -1  # a chunk's row count when its owner could not extract it


def on_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a GPU the buffer feeds through pinned memory and CUDA streams (the one
    place that decides it: the dry run, scripts/dry_run.py, lets its stand-in GPU answer too)."""
    return device.type == "cuda"


class _Cancelled(Exception):
    """Raised inside a prefetch that is no longer wanted (resume, close)."""


class ChunkShare:
    """How a tensor-parallel group fills its buffers: which rank extracts chunk ``c`` of a refill,
    and the broadcast of its rows to the others, by pieces of at most ``piece_bytes``.

    ``group``: a process group over the tensor-parallel ranks that nothing but the data uses (its
    collectives may run on the prefetch thread while the training thread runs its own);
    ``device``: where its collectives run (the training device: CUDA for NCCL, CPU for gloo)."""

    def __init__(self, group: Any, device: torch.device | str, piece_bytes: int | None = None):
        self.group, self.device = group, torch.device(device)
        self.piece_bytes = piece_bytes or PIECE_BYTES
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._stage: torch.Tensor | None = None  # one piece, when the buffer is not on ``device``
        # Refills started from now on hold only this rank's columns of y (``columns``); set by
        # ``ActivationSource.deliver_target_columns`` under the code tensor-parallel layout.
        self.y_columns = False

    def owner(self, first: int, c: int) -> int:
        return (first + c) % self.size

    def header(self, owner: int, x: torch.Tensor | None, y: torch.Tensor | None) -> tuple:
        """``(rows, x row shape, y row shape, x dtype, y dtype)`` of the owner's chunk, on every rank;
        ``x is None`` on the owner: it failed, and every rank raises."""
        h = torch.zeros(7, dtype=torch.int64)
        if self.rank == owner:
            if x is None or y is None:
                h[0] = _FAILED
            else:
                h = torch.tensor(
                    [x.shape[0], *x.shape[1:], *y.shape[1:], _DTYPES.index(x.dtype), _DTYPES.index(y.dtype)]
                )
        h = h.to(self.device)
        dist.broadcast(h, group=self.group, group_src=owner)
        rows, lx, dx, ly, dy, tx, ty = h.tolist()
        if rows == _FAILED and self.rank != owner:
            raise RuntimeError(
                f"Tensor-parallel rank {owner} could not extract its chunk of the activation buffer "
                "(its own error is in its log); this rank stops with it."
            )
        return rows, (lx, dx), (ly, dy), _DTYPES[tx], _DTYPES[ty]

    def rows(self, owner: int, t: torch.Tensor | None, out: torch.Tensor) -> None:
        """The owner's rows ``t`` (``None`` on the others) into ``out`` (the slot's rows) on every rank."""
        n = out.shape[0]
        step = max(1, self.piece_bytes // (out[0].numel() * out.element_size()))
        if self.rank == owner:
            assert t is not None
            out.copy_(t[:n], non_blocking=True)
            for a in range(0, n, step):
                dist.broadcast(
                    t[a : a + step].to(self.device).contiguous(), group=self.group, group_src=owner
                )
            return
        direct = out.device == self.device  # else through one piece on the collectives' device
        for a in range(0, n, step):
            b = min(n, a + step)
            piece = out[a:b] if direct else self._piece(step, out)[: b - a]
            dist.broadcast(piece, group=self.group, group_src=owner)
            if not direct:
                out[a:b].copy_(piece, non_blocking=True)

    def columns(self, owner: int, t: torch.Tensor | None, out: torch.Tensor) -> None:
        """The owner's rows ``t [n, ..., d]`` (``None`` on the others) scattered by columns: rank r
        gets ``t[..., r·d/size : (r+1)·d/size]`` into ``out [n, ..., d/size]``. For y under the
        ``code`` tensor-parallel layout, where each rank's loss reads only its columns of ŷ and y
        (``y_columns``): 1/size of the bytes a broadcast of whole rows moves."""
        n, w = out.shape[0], out.shape[-1]
        step = max(1, self.piece_bytes // (out[0].numel() * self.size * out.element_size()))
        direct = out.device == self.device
        for a in range(0, n, step):
            b = min(n, a + step)
            piece = out[a:b] if direct else self._piece(step, out)[: b - a]
            parts = None
            if self.rank == owner:
                assert t is not None
                rows = t[a:b].to(self.device)
                parts = [rows[..., r * w : (r + 1) * w].contiguous() for r in range(self.size)]
            dist.scatter(piece, parts, group=self.group, group_src=owner)
            if not direct:
                out[a:b].copy_(piece, non_blocking=True)

    def _piece(self, step: int, like: torch.Tensor) -> torch.Tensor:
        shape = (step, *like.shape[1:])
        if self._stage is None or tuple(self._stage.shape) != shape or self._stage.dtype != like.dtype:
            self._stage = torch.empty(shape, dtype=like.dtype, device=self.device)
        return self._stage


@dataclass
class _Refill:
    """One buffer's storage and what it holds."""

    x: torch.Tensor | None = None  # [cap, L, d_in]
    y: torch.Tensor | None = None  # [cap, L, d_out]
    rows: int = 0
    loader_state: dict | None = None  # loader state at the start of this refill (own loader)
    loader_end: dict | None = None  # and at its end: where the next refill starts
    adopted: dict | None = None  # the adopted refill this slot holds (None: read from the own loader)
    ready: Any = None  # CUDA event recorded when a prefetch on the side stream finished
    first: int = 0  # tensor parallelism: the rank that extracted chunk 0
    chunks: int = 0  # chunks it holds
    y_columns: bool = False  # y holds only this rank's columns (``ChunkShare.columns``)


REFILL_THREAD = "tclt-refill"
"""The name of the thread a prefetched refill runs on."""


class _Job(threading.Thread):
    """A daemon thread running one refill; ``result()`` joins it and re-raises its error."""

    def __init__(self, fn: Callable[[], None]):
        super().__init__(name=REFILL_THREAD, daemon=True)
        self.fn, self.error = fn, None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as e:  # re-raised on the training thread by result()
            self.error = e

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


class ShuffleBuffer:
    """Activation rows from ``extract(batch)`` over ``loader``, served in shuffled batches (``Stateful``)."""

    def __init__(
        self,
        loader: Any,
        extract: Extract,
        buffer_tokens: int,
        passes: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
        prefetch: bool = False,
        lock: Any = None,
        replay: Replay | None = None,
        share: ChunkShare | None = None,
        pin_memory: bool = False,
    ):
        if buffer_tokens < 1 or passes < 1:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) and buffer_passes ({passes}) must be >= 1.")
        self.loader, self.extract = loader, extract
        # origin of an adopted refill, this rank's chunks -> (their batches, extract)
        self.replay = replay
        self.share = share
        self.buffer_tokens, self.passes = buffer_tokens, passes
        self.device = torch.device(device)
        # A host buffer feeding a CUDA device: pinned, so batches and refills copy asynchronously.
        self.pin_memory = pin_memory and self.device.type == "cpu"
        self.generator = torch.Generator().manual_seed(seed)
        self.prefetch = prefetch
        # Held while a batch is read and extracted: the LLM and tokenizer may be shared (evaluator).
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._slots = [_Refill(), _Refill()] if prefetch else [_Refill()]
        self._cur = 0
        self._job: _Job | None = None  # the prefetch in flight, filling the other slot
        self._stop = threading.Event()
        cuda = on_gpu(self.device) or self.pin_memory
        self._stream = (
            torch.cuda.Stream(self.device if on_gpu(self.device) else None) if prefetch and cuda else None
        )
        self._main_stream = (
            torch.cuda.current_stream(self._stream.device) if self._stream is not None else None
        )
        self._staging: list[list[Any]] = []  # two pinned [x, y, copied event] batches, used in turn
        self._it: Any = None
        self.x: torch.Tensor | None = None  # [N, L, d_in] rows of the refill being drained
        self.y: torch.Tensor | None = None  # [N, L, d_out]
        self.rows = 0  # rows filled (N)
        self._y_columns = False  # self.y is this rank's columns only (the code tp layout)
        self._perm: torch.Tensor | None = None
        self._loader_state: dict | None = None  # loader state at the start of the current refill
        self._loader_end: dict | None = None  # loader state at its end
        self._adopted: dict | None = None  # the adopted refill being drained (None: an own one)
        self._queue: list[dict] = []  # adopted refills to drain after this one, before the own loader
        self._started = False
        self._gen_state: torch.Tensor | None = None  # generator state before the current permutation
        self._first = 0  # tensor parallelism: the rank that extracts the next own refill's chunk 0
        self._cur_first = 0  # and the refill being drained's
        self.pass_idx = 0
        self.pos = 0
        self.refills = 0
        self._replay = False

    def capacity(self, chunk_rows: int) -> int:
        """Rows a refill of chunks of ``chunk_rows`` holds: ``buffer_tokens`` rounded up to one chunk."""
        return -(-self.buffer_tokens // chunk_rows) * chunk_rows

    # -- filling -------------------------------------------------------------------------------
    def _feed(self, slot: _Refill) -> tuple[Any, Extract]:
        """Where the next refill comes from: the first adopted refill still queued, else the own
        loader. Called on the training thread (starting DataLoader workers from the prefetch thread
        would fork a multi-threaded process)."""
        adopted = slot.adopted = self._queue[0] if self._queue else None
        if adopted is None:
            if self._it is None:
                self._it = iter(self.loader)
            slot.loader_state = copy.deepcopy(self.loader.state_dict())
            slot.first = self._first
            return self._it, self.extract
        if self.replay is None:
            raise RuntimeError("This buffer cannot replay adopted refills (no replay callback).")
        lane = (self.share.rank, self.share.size) if self.share is not None else (0, 1)
        loader, extract = self.replay(adopted["origin"], lane)
        slot.loader_state, slot.first = None, 0
        return iter(loader), extract

    def _chunk(self, it: Any, extract: Extract) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of this rank's feed, extracted."""
        with self._lock:
            try:
                batch = next(it)
            except StopIteration as e:
                raise RuntimeError("The data stream ended while filling the activation buffer.") from e
            return extract(batch)

    def _own_chunk(self, it: Any, extract: Extract) -> tuple[Any, Any, Exception | None]:
        """``(x, y, None)`` or ``(None, None, error)``: under tensor parallelism an error is raised at
        this rank's turn, once the group knows (the others would wait for its chunk forever)."""
        try:
            return (*self._chunk(it, extract), None)
        except Exception as e:  # noqa: BLE001 - raised at this rank's turn
            return None, None, e

    def _fill(self, slot: _Refill, feed: tuple[Any, Extract]) -> None:
        """Extract the next refill into ``slot`` (on the training thread or the prefetch thread)."""
        it, extract = feed
        adopted, share = slot.adopted, self.share
        filled = c = 0
        ahead = None  # tensor parallelism: this rank's next chunk, extracted before its turn
        from_cuda = False
        cols = share is not None and share.y_columns  # read once: a refill's slot has one y width
        while filled < self.buffer_tokens:
            if self._stop.is_set():
                raise _Cancelled
            owner = share.owner(slot.first, c) if share is not None else 0
            x = y = None
            if share is None:
                x, y = self._chunk(it, extract)
            elif owner == share.rank:  # a rank whose turn it is not reads nothing
                x, y, error = ahead if ahead is not None else self._own_chunk(it, extract)
                ahead = None
                if error is not None:
                    share.header(owner, None, None)  # the others stop too
                    raise error
            if share is not None:
                rows, x_row, y_row, x_dtype, y_dtype = share.header(owner, x, y)
            else:
                assert x is not None and y is not None
                rows, x_row, y_row, x_dtype, y_dtype = x.shape[0], x.shape[1:], y.shape[1:], x.dtype, y.dtype
            # Whole chunks so no row is wasted; allocated once unless an adopted refill had
            # another chunk size.
            cap = self.capacity(rows)
            if cols:
                assert share is not None
                if y_row[-1] % share.size:
                    raise ConfigError(
                        f"d_out = {y_row[-1]} does not split over {share.size} tensor-parallel ranks: "
                        'parallelism.tp_layout = "code" needs d_out divisible by parallelism.tp.'
                    )
                y_row = (*y_row[:-1], y_row[-1] // share.size)
            stale = slot.x is None or slot.y is None
            if stale or (
                filled == 0 and (tuple(slot.x.shape), tuple(slot.y.shape)) != ((cap, *x_row), (cap, *y_row))
            ):
                slot.x = slot.y = None  # the old pair is freed before the new one is allocated
                slot.x = self._empty((cap, *x_row), x_dtype)
                slot.y = self._empty((cap, *y_row), y_dtype)
            assert slot.x is not None and slot.y is not None
            n = min(rows, slot.x.shape[0] - filled)
            if share is None:
                assert x is not None and y is not None
                slot.x[filled : filled + n].copy_(x[:n], non_blocking=True)
                slot.y[filled : filled + n].copy_(y[:n], non_blocking=True)
                from_cuda |= on_gpu(x.device)
            else:
                # A receiver whose chunk comes later in this refill extracts it now, before chunk c
                # arrives: the owners of a refill's chunks run the LLM at the same time, each holding
                # one extraction (chunks of a refill have one size).
                later = -(-(self.buffer_tokens - filled - n) // rows)  # chunks after this one
                if owner != share.rank and ahead is None and 0 < (share.rank - owner) % share.size <= later:
                    ahead = self._own_chunk(it, extract)
                share.rows(owner, x, slot.x[filled : filled + n])
                if cols:
                    share.columns(owner, y, slot.y[filled : filled + n])
                else:
                    share.rows(owner, y, slot.y[filled : filled + n])
                from_cuda |= on_gpu(share.device)
                x = y = None  # this rank's extraction is freed before it extracts the next one
            filled += n
            c += 1
        if ahead is not None:
            raise RuntimeError(
                "A chunk was extracted ahead for a refill it did not belong to (chunk sizes varied)."
            )
        if from_cuda and self.device.type == "cpu":  # host rows copied asynchronously must land
            torch.cuda.current_stream().synchronize()
        slot.rows, slot.chunks, slot.y_columns = filled, c, cols
        slot.loader_end = copy.deepcopy(self.loader.state_dict()) if adopted is None else None
        if adopted is None and share is not None:
            self._first = share.owner(slot.first, c)
        if adopted is not None and filled != adopted["rows"]:
            raise ConfigError(
                f"A refill of an old rank replayed to {filled} rows, but it held {adopted['rows']}: "
                "resume with the data.buffer_tokens, llm_batch_size and seq_len it was saved with."
            )

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pin_memory)
        if self._stream is not None and on_gpu(self.device):  # allocated on the side stream
            t.record_stream(self._main_stream)
        return t

    def _produce(self, slot: _Refill, feed: tuple[Any, Extract], after: Any) -> None:
        if self._stream is None:
            self._fill(slot, feed)
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(after)  # the training stream is done reading this slot
            self._fill(slot, feed)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self._stream)

    def _start_prefetch(self) -> None:
        free = self._slots[1 - self._cur]
        after = None
        if self._stream is not None:
            after = torch.cuda.Event()
            after.record(self._main_stream)
        feed = self._feed(free)
        self._job = _Job(lambda: self._produce(free, feed, after))
        self._job.start()

    def _cancel_prefetch(self) -> None:
        """Stop and discard the prefetch in flight; the loader's iterator is then invalid.

        Under tensor parallelism the refill is finished instead (every rank of the group finishes
        it, so the broadcasts match up); only its result is discarded."""
        if self._job is None:
            return
        if self.share is None:
            self._stop.set()
        try:
            self._job.result()
        except Exception:  # noqa: BLE001 - the discarded refill's outcome does not matter
            pass
        finally:
            self._stop.clear()
            self._job = None
            self._it = None
            if self._stream is not None:  # its queued copies must land before the slot is reused
                self._stream.synchronize()

    def _next_refill(self) -> None:
        nxt = 1 - self._cur if self.prefetch else 0
        if self._job is not None:
            job, self._job = self._job, None
            job.result()  # waits only when extraction is slower than training
            slot = self._slots[nxt]
            if slot.ready is not None:
                self._main_stream.wait_event(slot.ready)
                slot.ready = None
        else:  # no prefetch, the first refill, or a resume: extract here
            self._fill(self._slots[nxt], self._feed(self._slots[nxt]))
        self._cur = nxt
        slot = self._slots[nxt]
        self.x, self.y, self.rows, self._loader_state = slot.x, slot.y, slot.rows, slot.loader_state
        self._y_columns = slot.y_columns
        self._to_own_columns()  # a refill prefetched whole before the switch to columns
        self._loader_end, self._adopted, self._cur_first = slot.loader_end, slot.adopted, slot.first
        if slot.adopted is not None:
            self._queue.pop(0)
        self._started = True
        self.refills += 1
        if self.prefetch:
            self._start_prefetch()

    def deliver_y_columns(self, tp_group: Any = None) -> bool:
        """From the next batch on, y holds only this rank's columns (``ChunkShare.columns``; the
        ``code`` tensor-parallel layout); refills started from now on move only those. False
        without tensor parallelism (nothing to split). ``tp_group``: the model's tp group, whose
        rank order decides which columns a rank's loss reads; the data's group must be the same."""
        if self.share is None:
            return False
        if tp_group is not None:
            mine, model = (
                dist.get_process_group_ranks(self.share.group),
                dist.get_process_group_ranks(tp_group),
            )
            if mine != model:  # else a rank would get another rank's columns of y
                raise RuntimeError(
                    f"the data's tp group {mine} is not the model's {model} (same ranks, same order)"
                )
        self.share.y_columns = True
        self._to_own_columns()  # the refill being drained was filled whole
        return True

    def _to_own_columns(self) -> None:
        share = self.share
        if self.y is None or self._y_columns or share is None or not share.y_columns:
            return
        from torchtitan_clt.distributed.tp_code import d_slice

        self.y, self._y_columns = d_slice(self.y, share.group), True

    def _new_pass(self, pass_idx: int) -> None:
        self.pass_idx, self.pos = pass_idx, 0
        self._gen_state = self.generator.get_state()
        self._perm = torch.randperm(self.rows, generator=self.generator).to(self.device)

    def _advance(self) -> None:
        if self._perm is not None and self.pass_idx + 1 < self.passes:
            self._new_pass(self.pass_idx + 1)
        else:
            self._next_refill()
            if self._adopted is None:
                self._new_pass(0)
            else:  # go on where its old rank stopped
                self.generator.set_state(self._adopted["generator"])
                self._new_pass(int(self._adopted["pass_idx"]))
                self.pos = int(self._adopted["pos"])

    def _restore(self) -> None:
        # Replay the refill being drained when the state was taken (dealt as it was), then its
        # permutation.
        self._replay = False
        assert self._loader_state is not None and self._gen_state is not None
        pass_idx, pos, first = self.pass_idx, self.pos, self._first
        self._cancel_prefetch()
        self.loader.load_state_dict(self._loader_state)
        self._it = None
        self._first = first
        self._next_refill()
        self.generator.set_state(self._gen_state)
        self._new_pass(pass_idx)
        self.pos = pos

    # -- serving -------------------------------------------------------------------------------
    def next_batch(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [batch_size, L, d_in], y [batch_size, L, d_out])`` in the buffer's dtype, on the
        buffer's device, or on ``device`` (a CUDA one) through pinned memory for a pinned buffer."""
        if self._replay:
            self._restore()
        staged = self.pin_memory and device is not None and on_gpu(torch.device(device))
        xs, ys = [], []
        stage: list[Any] | None = None
        done = 0
        while done < batch_size:
            if self._perm is None or self.pos >= self.rows:
                self._advance()
            assert self._perm is not None and self.x is not None and self.y is not None
            take = min(batch_size - done, self.rows - self.pos)
            idx = self._perm[self.pos : self.pos + take]
            if staged:  # gathered now: the prefetch may refill this slot once the next one starts
                stage = stage or self._stage(batch_size)
                torch.index_select(self.x, 0, idx, out=stage[0][done : done + take])
                torch.index_select(self.y, 0, idx, out=stage[1][done : done + take])
            else:
                xs.append(self.x[idx])
                ys.append(self.y[idx])
            self.pos += take
            done += take
        if stage is not None:
            x, y = stage[0].to(device, non_blocking=True), stage[1].to(device, non_blocking=True)
            stage[2] = torch.cuda.Event()
            stage[2].record()  # the staging is reused once this copy is done
            return x, y
        if len(xs) == 1:
            return xs[0], ys[0]
        return torch.cat(xs), torch.cat(ys)

    def _stage(self, batch_size: int) -> list[Any]:
        """The next of two pinned staging batches, once its last copy to the device is done."""
        assert self.x is not None and self.y is not None
        shape = (batch_size, *self.x.shape[1:])
        if not self._staging or tuple(self._staging[0][0].shape) != shape:
            self._staging = [
                [
                    torch.empty(shape, dtype=self.x.dtype, pin_memory=True),
                    torch.empty((batch_size, *self.y.shape[1:]), dtype=self.y.dtype, pin_memory=True),
                    None,
                ]
                for _ in range(2)
            ]
        self._staging.reverse()
        stage = self._staging[0]
        if stage[2] is not None:
            stage[2].synchronize()
        return stage

    def close(self) -> None:
        """Stop the prefetch thread and free both buffers."""
        self._cancel_prefetch()
        self._slots = [_Refill() for _ in self._slots]
        self.x = self.y = None
        self._staging = []

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Own refill being drained: ``loader`` (its start), ``loader_end``, ``generator``, ``pass_idx``,
        ``pos``, ``rows``; an adopted one: ``origin`` instead of the loader states. ``queue``: the
        adopted refills after it. Under tensor parallelism ``first``: the rank that extracted the
        refill's chunk 0 (not started: the next refill's)."""
        queue = copy.deepcopy(self._queue)
        if not self._started:  # nothing served yet
            sd = {"started": False, "generator": self.generator.get_state(), "queue": queue}
            if self.share is not None:
                sd["first"] = self._first
            return sd
        assert self._gen_state is not None
        sd = {
            "started": True,
            "loader": copy.deepcopy(self._loader_state),
            "loader_end": copy.deepcopy(self._loader_end),
            "origin": copy.deepcopy(self._adopted["origin"]) if self._adopted is not None else None,
            "generator": self._gen_state.clone(),
            "pass_idx": self.pass_idx,
            "pos": self.pos,
            "rows": self.rows,
            "refills": self.refills,
            "queue": queue,
        }
        if self.share is not None:
            sd["first"] = self._cur_first
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._cancel_prefetch()
        self._queue = copy.deepcopy(sd.get("queue", []))
        self._perm, self._adopted, self._replay, self._it = None, None, False, None
        self._first = int(sd.get("first", 0))
        if not sd["started"]:
            self.generator.set_state(sd["generator"])
            self._started = False
            return
        self.refills = int(sd["refills"]) - 1  # the replay counts the refill again
        if sd.get("origin") is not None:  # draining an adopted refill: replay it first, then the queue
            self._queue.insert(0, self.in_flight(sd, None)[0])
            self._first = 0  # own refills are dealt from rank 0 after adopted ones
            self._started = False
            return
        self._loader_state = copy.deepcopy(sd["loader"])
        self._loader_end = copy.deepcopy(sd.get("loader_end"))
        self._gen_state = sd["generator"].clone()
        self.pass_idx, self.pos, self.rows = int(sd["pass_idx"]), int(sd["pos"]), int(sd.get("rows", 0))
        self._started = self._replay = True

    @staticmethod
    def in_flight(sd: dict[str, Any], own_origin: Any) -> list[dict[str, Any]]:
        """The refills a saved buffer state has not finished: the one being drained (``origin``:
        ``own_origin`` if it came from the own loader), then the queued ones."""
        out = []
        if sd["started"]:
            origin = sd.get("origin")
            out.append(
                {
                    "origin": copy.deepcopy(origin if origin is not None else own_origin),
                    "generator": sd["generator"].clone(),
                    "pass_idx": int(sd["pass_idx"]),
                    "pos": int(sd["pos"]),
                    "rows": int(sd["rows"]),
                }
            )
        return out + copy.deepcopy(sd.get("queue", []))

    def remaining(self, refill: dict[str, Any]) -> int:
        """Rows of an in-flight refill still to be served (its passes left included)."""
        return max(0, self.passes - 1 - int(refill["pass_idx"])) * int(refill["rows"]) + max(
            0, int(refill["rows"]) - int(refill["pos"])
        )

    def pending(self) -> tuple[int, int]:
        """(adopted refills still queued, their rows still to be served)."""
        return len(self._queue), sum(self.remaining(r) for r in self._queue)

    def adopt(self, refills: list[dict[str, Any]]) -> None:
        """Start over: drain ``refills`` (from ``in_flight`` of old ranks) first, each from where it
        stopped, then read the own loader from its current state."""
        self._cancel_prefetch()
        self._queue = [copy.deepcopy(r) for r in refills if self.remaining(r) > 0]
        self._perm, self._adopted, self._replay, self._started, self._it = None, None, False, False, None
        self._loader_state = self._loader_end = self._gen_state = None
        self._first = 0
