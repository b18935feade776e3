"""Unit-norm decoder rows: each feature's whole decoder row (for a CLT, its writes to every later
layer, concatenated) is kept at norm 1 through training.

TopK and BatchTopK pick features by the size of their activation; with free decoder norms a
feature can trade a small activation for a large decoder row, so selection is not invariant to
that scale (Gao et al. 2024; Bussmann et al. 2024 keep the rows unit-norm). Each step the
gradient component along the row is removed before the optimizer step (the step then moves along
the sphere to first order) and the row is renormalized after it.

Rows come from the family (``Transcoder.decoder_rows()``: each decoder parameter with the
dimensions one feature's row spans). FSDP shards dim 0 and the ``features`` tensor-parallel layout
the feature dim, so there every rank works on its local shard alone; the ``code`` layout shards
d_out, one of the row's dimensions: the row sums are then all-reduced over tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard

from torchtitan_clt.models.common import is_dtensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 rows in fp32, fp64 kept


def _row_groups(p: torch.Tensor, dims: tuple[int, ...]) -> list:
    """The process groups sharding one of a row's ``dims`` of ``p`` (the code layout's d_out)."""
    if not is_dtensor(p):
        return []
    row = {d % p.dim() for d in dims}
    return [
        p.device_mesh.get_group(i)
        for i, pl in enumerate(p.placements)
        if isinstance(pl, Shard) and pl.dim % p.dim() in row
    ]


def _row_sum(x: torch.Tensor, dims: tuple[int, ...], groups: list) -> torch.Tensor:
    s = x.sum(dims, keepdim=True)
    for g in groups:
        dist.all_reduce(s, group=g)
    return s


class UnitNormDecoder:
    """``project_grads()`` before ``optimizer.step()``, ``normalize()`` after it (and once after
    init). ``rows``: ``[(param, dims)]``, the norm of a feature's row taken over ``dims``."""

    def __init__(self, rows: list[tuple[torch.Tensor, tuple[int, ...]]], eps: float = 1e-12):
        if not rows:
            raise ValueError(
                "model.decoder_unit_norm needs the family's decoder rows (Transcoder.decoder_rows); "
                'this family declares none: set model.decoder_unit_norm = "false".'
            )
        self.rows, self.eps = rows, eps

    @torch.no_grad()
    def project_grads(self) -> None:
        """g ← g − (g·w / ‖w‖²) w per row."""
        for p, dims in self.rows:
            if p.grad is None:
                continue
            w, g = _wide(_local(p)), _local(p.grad)
            groups = _row_groups(p, dims)
            coef = _row_sum(_wide(g) * w, dims, groups) / _row_sum(w.pow(2), dims, groups).clamp_min(self.eps)
            g.sub_((coef * w).to(g.dtype))

    @torch.no_grad()
    def normalize(self) -> None:
        """w ← w / ‖w‖ per row."""
        for p, dims in self.rows:
            w = _local(p)
            groups = _row_groups(p, dims)
            if groups:
                norm = _row_sum(_wide(w).pow(2), dims, groups).sqrt().clamp_min(self.eps)
            else:
                norm = torch.linalg.vector_norm(_wide(w), dim=dims, keepdim=True).clamp_min(self.eps)
            w.copy_((_wide(w) / norm).to(w.dtype))


def build_decoder_constraint(model, model_cfg) -> UnitNormDecoder | None:
    """The constraint ``model.decoder_unit_norm`` asks for, or None. ``auto``: on for TopK and
    BatchTopK in a family that declares decoder rows; ``true`` fails on one that does not."""
    setting = model_cfg.decoder_unit_norm
    rows = model.decoder_rows()
    if setting == "auto":
        on = model_cfg.activation in ("topk", "batchtopk") and bool(rows)
    else:
        on = setting == "true"
    return UnitNormDecoder(rows) if on else None
