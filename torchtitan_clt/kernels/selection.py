"""The one TopK / BatchTopK selection routine, on one process or over ranks.

Every path that selects calls ``select``: the sparse training step (``sparse_step.SparseEncode``),
the activation modules' dense forward (``models/activations.py``) and the dense reference step.

Over ranks (``group``: every rank that holds a different part of the pre-activations, rows under
data parallelism, features under tensor parallelism) the answer is the one-process answer on the
concatenated ``h``. Each rank first selects locally with the *global* budget (k·B_global per layer
or k·B_global·L; k per row for TopK), which keeps every entry of the global selection that it
holds: the global threshold is at least the local one. The global threshold is then the budget-th
largest of the ranks' local picks (``global_kth_largest``: two small all-gathers, never the dense
``h``), and each rank keeps its picks above it.

Ties at the threshold, the same on every layout:
- TopK keeps exactly k per token and layer: ties go to the lowest global feature id, on one
  process (both backends) and under tensor parallelism, where the features are split in rank
  order (rank r holds the r-th block); a third all-gather of per-row tie counts tells each rank
  how many of its tied entries are left after the lower ranks' (``_topk_exact``).
- BatchTopK keeps every entry equal to the threshold, on one process and on every mesh, so a
  batch can keep more than its k·B budget when values tie there (with bf16 pre-activations it
  may). Breaking those ties by id would tie the selection to the order of the batch's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.collectives import all_min, global_kth_largest, world_size
from torchtitan_clt.kernels.layout_torch import mark_every_slot, one_thread

KINDS = ("batchtopk", "topk")


@dataclass(frozen=True)
class Selection:
    """What to keep of ``h [N, L, F]``."""

    kind: str
    """``batchtopk``: the k·N largest per layer (scope ``layer``) or k·N·L over all layers
    (``all``), N the global batch; ``topk``: the k largest per token and layer."""
    k: int
    scope: str = "layer"
    positive: bool = True
    """Also drop entries <= 0 (the selection of ReLU(h))."""
    fixed: torch.Tensor | None = field(default=None, compare=False, repr=False)
    """BatchTopK ids ``[N, L, K]`` chosen beforehand, returned as they are: the step's selection
    over all its micro-batches under gradient accumulation (``kernels/step_selection.py``)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"selection kind {self.kind!r}: use one of {KINDS}")
        if self.scope not in dispatch.SCOPES:
            raise ValueError(f"batchtopk scope {self.scope!r}: use one of {dispatch.SCOPES}")


def select(
    h: torch.Tensor,
    sel: Selection,
    backend: str | None = None,
    group=None,
    batch_scale: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h [N, L, F]`` (this rank's rows and features) -> ``(idx [N, L, K], tau [L])``: the kept
    feature ids (local to this rank's features, ascending, -1 padding) and the threshold (fp32;
    NaN for TopK). ``group``: the ranks over which ``h`` is split (None: one process); for TopK only
    ranks holding the same rows may take part. ``batch_scale``: global N / local N (BatchTopK).
    Gather the values with ``dispatch.gather_selected(h, idx)`` (differentiable)."""
    h = h.detach()
    n, n_layers, f = h.shape
    if sel.fixed is not None:  # already global: no threshold to find, nothing to exchange
        return sel.fixed, torch.full((n_layers,), float("nan"), device=h.device)
    distributed = world_size(group) > 1
    if sel.kind == "topk":
        idx = _topk_ids(h, sel.k, sel.positive, backend)
        if not distributed:  # k slots a row, padding only at picks <= 0: a layout with no host read
            return mark_every_slot(idx), torch.full((n_layers,), float("nan"), device=h.device)
        return _topk_exact(h, idx, sel.k, group), torch.full((n_layers,), float("nan"), device=h.device)
    k_total = sel.k * n * batch_scale * (n_layers if sel.scope == "all" else 1)
    idx, tau = dispatch.batchtopk_select_ids(h, k_total, sel.scope, sel.positive, backend)
    if not distributed:
        return idx, tau
    cand = _candidates(h, idx).permute(1, 0, 2)  # [L, N, K]
    cand = cand.reshape(n_layers, -1) if sel.scope == "layer" else cand.reshape(1, -1)
    tau = global_kth_largest(cand, k_total, group).float().expand(n_layers).contiguous()
    return _keep_at_least(h, idx, tau.view(1, n_layers, 1)), tau


def min_selected(h: torch.Tensor, idx: torch.Tensor, group=None) -> torch.Tensor:
    """``[L]`` the smallest kept positive pre-activation per layer over every rank of ``group``
    (+inf where none): what TopK / BatchTopK track as their inference threshold."""
    with one_thread(h.device):
        v = _candidates(h.detach(), idx).float()
        v = torch.where(v > 0, v, torch.full_like(v, float("inf")))
        m = v.amin(dim=(0, 2)) if v.numel() else torch.full((h.shape[1],), float("inf"), device=h.device)
    return all_min(m, group)


def _candidates(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The values at ``idx`` (-inf at padding), detached."""
    with one_thread(h.device):
        v = h.gather(-1, idx.clamp(min=0)) if h.shape[-1] else h.new_zeros(idx.shape)
        return torch.where(idx >= 0, v, torch.full((), float("-inf"), dtype=v.dtype, device=v.device))


def _topk_exact(h: torch.Tensor, idx: torch.Tensor, k: int, group) -> torch.Tensor:
    """TopK over the ranks of ``group`` (features split in rank order): of this rank's local picks
    ``idx [N, L, K]`` (ascending ids, ties already lowest-id first), those in the global top k with
    ties broken by the lowest global feature id."""
    n, n_layers, _ = idx.shape
    cand = _candidates(h, idx)  # [N, L, K], -inf at padding
    tau = global_kth_largest(cand.reshape(n * n_layers, -1), k, group).view(n, n_layers, 1)
    with one_thread(h.device):
        valid = idx >= 0
        above = valid & (cand > tau.to(cand.dtype))
        tied = valid & (cand == tau.to(cand.dtype))
        counts = torch.stack([above.sum(-1), tied.sum(-1)], -1).to(torch.int32)  # [N, L, 2]
    parts = [torch.empty_like(counts) for _ in range(world_size(group))]
    dist.all_gather(parts, counts.contiguous(), group=group)
    me = dist.get_rank(group)
    with one_thread(h.device):
        every = torch.stack(parts)  # [W, N, L, 2]
        need = k - every[..., 0].sum(0)  # tied entries the row still takes, lowest ids first
        before = every[:me, ..., 1].sum(0)  # ... of which the lower ranks' (lower ids) go first
        quota = (need - before).clamp(min=0).unsqueeze(-1)  # [N, L, 1]
        keep = above | (tied & (tied.cumsum(-1) <= quota))
        return _repack(idx, keep, h.shape[-1])


def _repack(idx: torch.Tensor, keep: torch.Tensor, f: int) -> torch.Tensor:
    """``idx`` where ``keep``: ids ascending, padding (-1) last, width the widest row."""
    key = torch.where(keep, idx, f).sort(-1).values
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    key = key[..., :width]
    return torch.where(key < f, key, -1)


def _keep_at_least(h: torch.Tensor, idx: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``idx`` without the entries below ``tau`` (broadcast to ``[N, L, 1]``), re-packed: ids
    ascending, padding last, width the widest row."""
    f = h.shape[-1]
    with one_thread(h.device):
        keep = (idx >= 0) & (_candidates(h, idx) >= tau.to(h.dtype))
        key = torch.where(keep, idx, f).sort(-1).values
        width = int(keep.sum(-1).max()) if keep.numel() else 0
        key = key[..., :width]
        return torch.where(key < f, key, -1)


def _topk_ids(h: torch.Tensor, k: int, positive: bool, backend: str | None) -> torch.Tensor:
    """TopK per token and layer: ``h [N, L, F]`` -> ``idx [N, L, min(k, F)]``, ids ascending,
    entries <= 0 dropped (-1) when ``positive``."""
    n, n_layers, f = h.shape
    k = min(k, f)
    vals, idx = dispatch.topk_select(h.reshape(n * n_layers, f), k, backend)
    with one_thread(h.device):
        if positive:
            idx = torch.where(vals > 0, idx, -1)
        key = torch.where(idx >= 0, idx, f).sort(-1).values  # kept ids ascending, padding last
        idx = torch.where(key < f, key, -1)
    return idx.view(n, n_layers, k)
