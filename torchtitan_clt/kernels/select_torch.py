"""Torch fallbacks for the selection ops (TopK, BatchTopK threshold, compaction).

Sparse layout shared by every op: ``idx [N, G, K]`` (int64 feature ids, ``-1`` for padding) and
``vals [N, G, K]`` (0 at padding), one row per token and group (layer); K is the largest row count.
Within a row the ids ascend.
"""

from __future__ import annotations

import torch

# What the compaction keeps, given a threshold tau per group.
MODES = ("positive", "ge", "nonzero")


def topk_select(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``h [N, M]`` -> ``(vals [N, k], idx [N, k])``, the k largest per row (order unspecified)."""
    vals, idx = torch.topk(h, k, dim=-1, sorted=False)
    return vals, idx


def _tau_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def batchtopk_threshold(h: torch.Tensor, k_total: int, scope: str = "layer") -> torch.Tensor:
    """``h [N, L, F]`` -> ``tau [L]`` (fp32; fp64 for fp64 input): the k_total-th largest value per layer (``layer``) or over
    all layers jointly (``all``, the same value repeated). Uses quickselect (``kthvalue``), no sort."""
    n, n_layers, f = h.shape
    if scope == "layer":
        flat = h.transpose(0, 1).reshape(n_layers, n * f)  # [L, N*F]
    elif scope == "all":
        flat = h.reshape(1, -1)  # [1, N*L*F]
    else:
        raise ValueError(f"batchtopk scope {scope!r}: use 'layer' or 'all'")
    size = flat.shape[1]
    if k_total <= 0 or size == 0:
        return torch.full((n_layers,), float("inf"), dtype=_tau_dtype(h), device=h.device)
    k_total = min(int(k_total), size)
    tau = flat.kthvalue(size - k_total + 1, dim=1).values.to(_tau_dtype(h))  # [L] or [1]
    return tau.expand(n_layers).contiguous()


def _keep_mask(h: torch.Tensor, tau: torch.Tensor, mode: str) -> torch.Tensor:
    # h [N, G, M], tau [G]
    if mode == "nonzero":
        return h != 0
    keep = h >= tau.to(h.dtype)[None, :, None]
    if mode == "positive":
        keep &= h > 0
    elif mode != "ge":
        raise ValueError(f"compaction mode {mode!r}: use one of {MODES}")
    return keep


def compact(h: torch.Tensor, tau: torch.Tensor, mode: str = "positive") -> torch.Tensor:
    """``h [N, G, M]``, ``tau [G]`` -> ``idx [N, G, K]`` of the kept entries, -1 padded."""
    n, g, m = h.shape
    keep = _keep_mask(h, tau, mode)
    counts = keep.sum(-1).reshape(-1)  # [N*G]
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((n * g, width), -1, dtype=torch.long, device=h.device)
    if width == 0:
        return out.view(n, g, 0)
    nz = keep.reshape(n * g, m).nonzero()  # [nnz, 2] row-major: (row, feature), rows ascending
    rows, feats = nz[:, 0], nz[:, 1]
    starts = counts.cumsum(0) - counts
    pos = torch.arange(rows.numel(), device=h.device) - starts[rows]
    out[rows, pos] = feats
    return out.view(n, g, width)
