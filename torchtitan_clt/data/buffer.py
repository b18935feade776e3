"""Shuffle buffer: full refill, shuffle, drain (``passes`` times), so that resume is exact.

A refill pulls whole batches from the loader and extracts them until ``buffer_tokens`` rows are
held (rounded up to whole batches). Each pass draws a permutation from a seeded CPU generator and
serves rows in that order; a batch may span two passes or two refills. No row outlives its refill,
so the state is small: the loader's state at the start of the refill being drained, the generator
state before the current pass's permutation, the pass index and the read position.
``load_state_dict`` + the next ``next_batch`` replays that refill (one extra extraction) and
continues with exactly the rows an uninterrupted run would have served.

Resume on another number of ranks (``adopt``): every old rank was partway through a refill. The
new ranks first finish those refills (each is replayed by the ``replay`` callback from its old
rank's loader state, then served from the saved permutation, pass and position on), and only then
read their own loader, which the caller has set to where the old refills ended (``loader_end`` in
the state). So no row is skipped or served twice. Adopted refills waiting to be drained are part of
the state (``queue``), so a resumed run can itself be saved and resumed.

Prefetch (double buffering): while one refill is drained, a background thread extracts the next
one into a second pair of tensors (torch ops release the GIL; on CUDA the thread works on its own
stream). The rows, their order and the saved state are the same as without prefetch: the next
refill only starts earlier, and a resume recomputes it. It costs a second buffer's memory.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchtitan_clt.config.manager import ConfigError

Extract = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


class _Cancelled(Exception):
    """Raised inside a prefetch that is no longer wanted (resume, close)."""


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


class _Job(threading.Thread):
    """A daemon thread running one refill; ``result()`` joins it and re-raises its error."""

    def __init__(self, fn: Callable[[], None]):
        super().__init__(name="tclt-refill", daemon=True)
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
        replay: Callable[[Any], tuple[Any, Extract]] | None = None,
    ):
        if buffer_tokens < 1 or passes < 1:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) and buffer_passes ({passes}) must be >= 1.")
        self.loader, self.extract = loader, extract
        # origin of an adopted refill -> (its old rank's loader at the refill's start, extract)
        self.replay = replay
        self.buffer_tokens, self.passes = buffer_tokens, passes
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.prefetch = prefetch
        # Held while a batch is read and extracted: the LLM and tokenizer may be shared (evaluator).
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._slots = [_Refill(), _Refill()] if prefetch else [_Refill()]
        self._cur = 0
        self._job: _Job | None = None  # the prefetch in flight, filling the other slot
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(self.device) if prefetch and self.device.type == "cuda" else None
        self._main_stream = torch.cuda.current_stream(self.device) if self._stream is not None else None
        self._it: Any = None
        self.x: torch.Tensor | None = None  # [N, L, d_in] rows of the refill being drained
        self.y: torch.Tensor | None = None  # [N, L, d_out]
        self.rows = 0  # rows filled (N)
        self._perm: torch.Tensor | None = None
        self._loader_state: dict | None = None  # loader state at the start of the current refill
        self._loader_end: dict | None = None  # loader state at its end
        self._adopted: dict | None = None  # the adopted refill being drained (None: an own one)
        self._queue: list[dict] = []  # adopted refills to drain after this one, before the own loader
        self._started = False
        self._gen_state: torch.Tensor | None = None  # generator state before the current permutation
        self.pass_idx = 0
        self.pos = 0
        self.refills = 0
        self._replay = False

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
            return self._it, self.extract
        if self.replay is None:
            raise RuntimeError("This buffer cannot replay adopted refills (no replay callback).")
        loader, extract = self.replay(adopted["origin"])
        slot.loader_state = None
        return iter(loader), extract

    def _fill(self, slot: _Refill, feed: tuple[Any, Extract]) -> None:
        """Extract the next refill into ``slot`` (on the training thread or the prefetch thread)."""
        it, extract = feed
        adopted = slot.adopted
        filled = 0
        while filled < self.buffer_tokens:
            if self._stop.is_set():
                raise _Cancelled
            with self._lock:
                try:
                    batch = next(it)
                except StopIteration as e:
                    raise RuntimeError("The data stream ended while filling the activation buffer.") from e
                x, y = extract(batch)
            # Rounded up to whole extraction batches so no row is wasted; allocated once unless an
            # adopted refill had another batch size.
            cap = -(-self.buffer_tokens // x.shape[0]) * x.shape[0]
            if slot.x is None or (filled == 0 and tuple(slot.x.shape) != (cap, *x.shape[1:])):
                slot.x = torch.empty((cap, *x.shape[1:]), dtype=x.dtype, device=self.device)
                slot.y = torch.empty((cap, *y.shape[1:]), dtype=y.dtype, device=self.device)
                if self._stream is not None:  # allocated on the side stream, read on the main one
                    slot.x.record_stream(self._main_stream)
                    slot.y.record_stream(self._main_stream)
            assert slot.y is not None
            n = min(x.shape[0], slot.x.shape[0] - filled)
            slot.x[filled : filled + n] = x[:n].to(self.device, non_blocking=True)
            slot.y[filled : filled + n] = y[:n].to(self.device, non_blocking=True)
            filled += n
        slot.rows = filled
        slot.loader_end = copy.deepcopy(self.loader.state_dict()) if adopted is None else None
        if adopted is not None and filled != adopted["rows"]:
            raise ConfigError(
                f"A refill of an old rank replayed to {filled} rows, but it held {adopted['rows']}: "
                "resume with the data.buffer_tokens, llm_batch_size and seq_len it was saved with."
            )

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
        """Stop and discard the prefetch in flight; the loader's iterator is then invalid."""
        if self._job is None:
            return
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
        self._loader_end, self._adopted = slot.loader_end, slot.adopted
        if slot.adopted is not None:
            self._queue.pop(0)
        self._started = True
        self.refills += 1
        if self.prefetch:
            self._start_prefetch()

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
        # Replay the refill being drained when the state was taken, then its permutation.
        self._replay = False
        assert self._loader_state is not None and self._gen_state is not None
        pass_idx, pos = self.pass_idx, self.pos
        self._cancel_prefetch()
        self.loader.load_state_dict(self._loader_state)
        self._it = None
        self._next_refill()
        self.generator.set_state(self._gen_state)
        self._new_pass(pass_idx)
        self.pos = pos

    # -- serving -------------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [batch_size, L, d_in], y [batch_size, L, d_out])`` in the buffer's dtype."""
        if self._replay:
            self._restore()
        xs, ys = [], []
        need = batch_size
        while need > 0:
            if self._perm is None or self.pos >= self.rows:
                self._advance()
            assert self._perm is not None and self.x is not None and self.y is not None
            take = min(need, self.rows - self.pos)
            idx = self._perm[self.pos : self.pos + take]
            xs.append(self.x[idx])
            ys.append(self.y[idx])
            self.pos += take
            need -= take
        if len(xs) == 1:
            return xs[0], ys[0]
        return torch.cat(xs), torch.cat(ys)

    def close(self) -> None:
        """Stop the prefetch thread and free both buffers."""
        self._cancel_prefetch()
        self._slots = [_Refill() for _ in self._slots]
        self.x = self.y = None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Own refill being drained: ``loader`` (its start), ``loader_end``, ``generator``, ``pass_idx``,
        ``pos``, ``rows``; an adopted one: ``origin`` instead of the loader states. ``queue``: the
        adopted refills after it."""
        queue = copy.deepcopy(self._queue)
        if not self._started:  # nothing served yet
            return {"started": False, "generator": self.generator.get_state(), "queue": queue}
        assert self._gen_state is not None
        return {
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

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._cancel_prefetch()
        self._queue = copy.deepcopy(sd.get("queue", []))
        self._perm, self._adopted, self._replay, self._it = None, None, False, None
        if not sd["started"]:
            self.generator.set_state(sd["generator"])
            self._started = False
            return
        self.refills = int(sd["refills"]) - 1  # the replay counts the refill again
        if sd.get("origin") is not None:  # draining an adopted refill: replay it first, then the queue
            self._queue.insert(0, self.in_flight(sd, None)[0])
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
