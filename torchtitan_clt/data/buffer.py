"""Shuffle buffer: full refill, shuffle, drain (``passes`` times), so that resume is exact.

A refill pulls whole token batches from the loader and extracts them until ``buffer_tokens`` rows
are held (rounded up to whole batches). Each pass draws a permutation from a seeded CPU generator
and serves rows in that order; a batch may span two passes or two refills. No row outlives its
refill, so the state is small: the loader's state at the start of the refill being drained, the
generator state before the current pass's permutation, the pass index and the read position.
``load_state_dict`` + the next ``next_batch`` replays that refill (one extra extraction) and
continues with exactly the rows an uninterrupted run would have served.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

Extract = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ShuffleBuffer:
    """Activation rows from ``extract(tokens)`` over ``loader``, served in shuffled batches (``Stateful``)."""

    def __init__(
        self,
        loader: Any,
        extract: Extract,
        buffer_tokens: int,
        passes: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        if buffer_tokens < 1 or passes < 1:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) and buffer_passes ({passes}) must be >= 1.")
        self.loader, self.extract = loader, extract
        self.buffer_tokens, self.passes = buffer_tokens, passes
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._it: Any = None
        self.x: torch.Tensor | None = None  # [N, L, d_in]
        self.y: torch.Tensor | None = None  # [N, L, d_out]
        self.rows = 0  # rows filled (N)
        self._perm: torch.Tensor | None = None
        self._loader_state: dict | None = None  # loader state at the start of the current refill
        self._gen_state: torch.Tensor | None = None  # generator state before the current permutation
        self.pass_idx = 0
        self.pos = 0
        self.refills = 0
        self._replay = False

    # -- filling -------------------------------------------------------------------------------
    def _refill(self) -> None:
        if self._it is None:
            self._it = iter(self.loader)
        self._loader_state = copy.deepcopy(self.loader.state_dict())
        filled = 0
        while filled < self.buffer_tokens:
            try:
                tokens = next(self._it)
            except StopIteration as e:
                raise RuntimeError("The token stream ended while filling the activation buffer.") from e
            x, y = self.extract(tokens)
            if self.x is None:
                # Allocate once, rounded up to whole extraction batches so no row is wasted.
                n_batches = -(-self.buffer_tokens // x.shape[0])
                cap = n_batches * x.shape[0]
                self.x = torch.empty((cap, *x.shape[1:]), dtype=x.dtype, device=self.device)
                self.y = torch.empty((cap, *y.shape[1:]), dtype=y.dtype, device=self.device)
            assert self.y is not None
            n = min(x.shape[0], self.x.shape[0] - filled)
            self.x[filled : filled + n] = x[:n].to(self.device, non_blocking=True)
            self.y[filled : filled + n] = y[:n].to(self.device, non_blocking=True)
            filled += n
        self.rows = filled
        self.refills += 1

    def _new_pass(self, pass_idx: int) -> None:
        self.pass_idx, self.pos = pass_idx, 0
        self._gen_state = self.generator.get_state()
        self._perm = torch.randperm(self.rows, generator=self.generator).to(self.device)

    def _advance(self) -> None:
        if self._perm is not None and self.pass_idx + 1 < self.passes:
            self._new_pass(self.pass_idx + 1)
        else:
            self._refill()
            self._new_pass(0)

    def _restore(self) -> None:
        # Replay the refill being drained when the state was taken, then its permutation.
        self._replay = False
        assert self._loader_state is not None and self._gen_state is not None
        pass_idx, pos = self.pass_idx, self.pos
        self.loader.load_state_dict(self._loader_state)
        self._it = None
        self._refill()
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

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._loader_state is None:  # nothing served yet
            return {"started": False, "generator": self.generator.get_state()}
        return {
            "started": True,
            "loader": copy.deepcopy(self._loader_state),
            "generator": self._gen_state.clone(),
            "pass_idx": self.pass_idx,
            "pos": self.pos,
            "refills": self.refills,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not sd["started"]:
            self.generator.set_state(sd["generator"])
            return
        self._loader_state = copy.deepcopy(sd["loader"])
        self._gen_state = sd["generator"].clone()
        self.pass_idx, self.pos = int(sd["pass_idx"]), int(sd["pos"])
        self.refills = int(sd["refills"]) - 1  # the replay counts the refill again
        self._replay = True
