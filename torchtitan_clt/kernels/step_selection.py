"""BatchTopK over a step of several micro-batches (gradient accumulation), exactly.

The step selects what one forward of its whole batch would: per layer (scope ``layer``) or over
all layers (``all``) the k·B largest positive pre-activations of all B rows of the step, over every
rank of ``group`` (dp × tp, as ``selection.select``). A first pass, without gradients, hands each
micro-batch's pre-activations to ``StepSelection.add``. It keeps only that micro-batch's local top
k·B entries (ids and values): a subset's k·B-th largest is at most the whole step's, so these hold
every entry of the step's selection. What is held is then pruned below the running local k·B-th
largest, so at most about k·B entries per group plus one micro-batch's picks are ever kept, never
the dense h of the step. ``finish`` takes the step's threshold over the ranks
(``global_kth_largest``, two small all-gathers, as ``select`` does for one forward) and cuts each
micro-batch's picks at it; the second pass trains micro-batch j on ``ids(j)`` (``Selection.fixed``).

Fixed ids rather than a fixed threshold: the second pass recomputes h in the forward's own way
(e.g. a fused ``baddbmm``), which may round differently from the first pass's ``pre_acts``; a
threshold would then drop the step's k·B-th entry when it rounds down, the ids cannot.
"""

from __future__ import annotations

import torch

from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.collectives import all_min, global_kth_largest
from torchtitan_clt.kernels.layout_torch import one_thread
from torchtitan_clt.kernels.selection import Selection


def _cut(idx: torch.Tensor, vals: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``idx, vals [N, L, K]`` (-1 / -inf padding) with ``vals >= bound [L]``,
    re-packed: ids ascending, padding last, width the widest row."""
    with one_thread(idx.device):
        keep = (idx >= 0) & (vals >= bound.to(vals.dtype).view(1, -1, 1))
        big = torch.iinfo(idx.dtype).max
        key, order = torch.where(keep, idx, big).sort(-1)
        width = int(keep.sum(-1).max()) if keep.numel() else 0
        key, order = key[..., :width], order[..., :width]
        kept = key < big
        vals = torch.where(kept, vals.gather(-1, order), torch.full((), float("-inf"), dtype=vals.dtype))
        return torch.where(kept, key, -1), vals


class StepSelection:
    """The BatchTopK selection of one step made of micro-batches (see the module doc).

    ``rows``: this rank's rows in the whole step; ``group`` / ``batch_scale``: as for ``select``
    (every rank holding a different part of ``[B, L, F]``; global rows / this rank's rows)."""

    def __init__(
        self, sel: Selection, rows: int, group=None, batch_scale: int = 1, backend: str | None = None
    ):
        if sel.kind != "batchtopk":
            raise ValueError(f"StepSelection is for BatchTopK, got a {sel.kind!r} selection")
        self.sel, self.rows, self.backend = sel, rows, backend
        self.group, self.batch_scale = group, batch_scale
        self._ids: list[torch.Tensor] = []  # per micro-batch [b, L, K] int64, -1 padding
        self._vals: list[torch.Tensor] = []  # the values at those ids, -inf at padding
        self.tau: torch.Tensor | None = None  # [L] fp32 once finished

    def _budget(self, n_layers: int) -> int:
        return self.sel.k * self.rows * self.batch_scale * (n_layers if self.sel.scope == "all" else 1)

    def _pool(self) -> torch.Tensor:
        """``[G, M]`` every held value, per layer (G = L) or all layers as one group (G = 1)."""
        if self.sel.scope == "layer":
            return torch.cat([v.permute(1, 0, 2).reshape(v.shape[1], -1) for v in self._vals], dim=1)
        return torch.cat([v.reshape(1, -1) for v in self._vals], dim=1)

    def _cut_all(self, bound: torch.Tensor) -> None:
        bound = bound.float().expand(self._ids[0].shape[1]).contiguous()
        for j, (idx, vals) in enumerate(zip(self._ids, self._vals)):
            self._ids[j], self._vals[j] = _cut(idx, vals, bound)

    @torch.no_grad()
    def add(self, h: torch.Tensor) -> None:
        """First pass: one micro-batch's pre-activations ``h [b, L, F]`` (this rank's rows and
        features), in the dtype the training forward computes them in."""
        if self.tau is not None:
            raise RuntimeError("StepSelection.add after finish: build a new one for the next step")
        h = h.detach()
        budget = self._budget(h.shape[1])
        # This micro-batch's top `budget` (ties kept): every entry of the step's selection it holds.
        idx, _ = dispatch.batchtopk_select_ids(h, budget, self.sel.scope, self.sel.positive, self.backend)
        with one_thread(h.device):
            vals = h.gather(-1, idx.clamp(min=0)) if h.shape[-1] else h.new_zeros(idx.shape)
            vals = torch.where(
                idx >= 0, vals, torch.full((), float("-inf"), dtype=vals.dtype, device=h.device)
            )
        self._ids.append(idx)
        self._vals.append(vals)
        pool = self._pool()
        if pool.shape[1] > budget:  # drop what lies below the budget-th largest held so far
            self._cut_all(pool.topk(budget, dim=1, sorted=False).values.amin(dim=1))

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """The step's threshold ``[L]`` over every rank (a collective on ``group``); afterwards
        ``ids(j)`` is micro-batch j's selection. ``-inf``: fewer than k·B positive entries in the
        step, all of them kept."""
        if not self._ids:
            raise RuntimeError("StepSelection.finish before any micro-batch was added")
        n_layers = self._ids[0].shape[1]
        tau = global_kth_largest(self._pool(), self._budget(n_layers), self.group).float()
        self._cut_all(tau)
        self.tau = tau.expand(n_layers).contiguous()
        return self.tau

    def ids(self, j: int) -> torch.Tensor:
        """Micro-batch j's selected feature ids ``[b, L, K]`` (after ``finish``)."""
        if self.tau is None:
            raise RuntimeError("StepSelection.ids before finish")
        return self._ids[j]

    @torch.no_grad()
    def min_kept(self) -> torch.Tensor:
        """``[L]`` the smallest kept positive value per layer over the step and every rank (+inf
        where none): what ``selection.min_selected`` gives for one forward of the whole batch."""
        with one_thread(self._vals[0].device):
            mins = [
                torch.where(v > 0, v.float(), float("inf")).amin(dim=(0, 2))
                if v.numel()
                else torch.full((v.shape[1],), float("inf"), device=v.device)
                for v in self._vals
            ]
            m = torch.stack(mins).amin(0)
        return all_min(m, self.group)
