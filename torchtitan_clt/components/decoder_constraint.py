"""Unit-norm decoder rows: each feature's whole decoder row (for a CLT, its writes to every later
layer, concatenated) is kept at norm 1 through training.

TopK and BatchTopK pick features by the size of their activation; with free decoder norms a
feature can trade a small activation for a large decoder row, so selection is not invariant to
that scale (Gao et al. 2024; Bussmann et al. 2024 keep the rows unit-norm). Each step the
gradient component along the row is removed before the optimizer step (the step then moves along
the sphere to first order) and the row is renormalized after it.

Rows come from the family (``Transcoder.decoder_rows()``: each decoder parameter with the
dimensions one feature's row spans). Those dimensions are never sharded (FSDP shards dim 0 and
tensor parallel the feature dim), so every rank works on its local shard alone.
"""

from __future__ import annotations

import torch

from torchtitan_clt.models.common import is_dtensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))  # bf16 rows in fp32, fp64 kept


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
            coef = (_wide(g) * w).sum(dims, keepdim=True) / w.pow(2).sum(dims, keepdim=True).clamp_min(
                self.eps
            )
            g.sub_((coef * w).to(g.dtype))

    @torch.no_grad()
    def normalize(self) -> None:
        """w ← w / ‖w‖ per row."""
        for p, dims in self.rows:
            w = _local(p)
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
