"""One dispatch point per kernel op: Triton or the torch fallback (see ``backend.py``).

Every op takes ``backend=None`` (use the configured ``--kernels.backend``) or an explicit
``"auto" | "torch" | "triton"``. Both implementations compute the same function and are tested
against each other and against a float64 dense reference (tests/unit/test_kernels*.py).

Sparse layout: ``idx [N, G, K]`` int64 feature ids (-1 = padding, ids ascending in a row) and
``vals [N, G, K]`` (0 at padding), G = layers; K is the widest row. ``vals`` carries autograd
straight through to the selected pre-activations only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchtitan_clt.kernels import decode as _dec
from torchtitan_clt.kernels import select_torch as _sel_torch
from torchtitan_clt.kernels.backend import options, resolve_backend
from torchtitan_clt.kernels.layout_torch import one_thread

SCOPES = ("layer", "all")


def _gather_vals(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # straight-through: d vals / d h is 1 at the selected entries, 0 elsewhere (gather's backward)
    if h.dim() == 3:  # gathered layer-major ([L, N, K]) so vals share idx's layer-major storage
        return _gather_last(h.permute(1, 0, 2), idx.permute(1, 0, 2)).permute(1, 0, 2)
    return _gather_last(h, idx)


def _gather_last(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    with one_thread(h.device):  # ~k*N entries: bookkeeping-sized
        vals = h.gather(-1, idx.clamp(min=0))
        return torch.where(idx >= 0, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))


# --------------------------------------------------------------------------- selection
def topk_select(h: torch.Tensor, k: int, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK per row: ``h [N, M]`` -> ``(vals [N, k], idx [N, k])``; order within a row unspecified.
    ``vals`` are the raw pre-activations (apply ReLU after if the activation wants it)."""
    if not 0 <= k <= h.shape[-1]:
        raise ValueError(f"topk k={k} must lie in [0, {h.shape[-1]}] (features per row)")
    if resolve_backend(h, backend) == "triton" and k > 0 and h.shape[0] > 0:
        from torchtitan_clt.kernels import select_triton

        idx = select_triton.topk_select(h.detach(), k)
        return _gather_vals(h, idx), idx
    return _sel_torch.topk_select(h, k)


def batchtopk_threshold(
    h: torch.Tensor, k_total: int, scope: str = "layer", backend: str | None = None
) -> torch.Tensor:
    """``h [N, L, F]`` -> ``tau [L]`` fp32, the ``k_total``-th largest value of each layer
    (``scope="layer"``) or of all layers jointly (``"all"``, repeated L times). +inf if k_total<=0.
    Found by selection (radix select on the float bits / topk candidates + quickselect), never a
    full sort. One process; over ranks use ``kernels.selection.select``."""
    if scope not in SCOPES:
        raise ValueError(f"batchtopk scope {scope!r}: use one of {SCOPES}")
    n, n_layers, f = h.shape
    if resolve_backend(h, backend) != "triton" or k_total <= 0 or h.numel() == 0:
        return _sel_torch.batchtopk_threshold(h.detach(), k_total, scope)
    from torchtitan_clt.kernels import select_triton

    h = h.detach()
    if scope == "layer":
        kth = torch.full((n_layers,), min(k_total, n * f), dtype=torch.long, device=h.device)
        tau, _ = select_triton.radix_kth_largest(h, kth)  # groups = layers, over [N, F]
        return tau
    hp = h.permute(1, 0, 2)
    # One group over every element, seen as N*L rows of F so the scan splits over up to ~1024
    # programs (as [L, 1, N*F] it ran on L programs of N*F elements each, issue 28). A [L, N, F]-
    # stored tensor (the encoder's bmm output) is not copied.
    h3 = (hp if hp.is_contiguous() else h.contiguous()).reshape(n * n_layers, 1, f)
    kth = torch.full((1,), min(k_total, h.numel()), dtype=torch.long, device=h.device)
    tau, _ = select_triton.radix_kth_largest(h3, kth)
    return tau.expand(n_layers).contiguous()


def compact(
    h: torch.Tensor, tau: torch.Tensor, mode: str = "positive", backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep entries of ``h [N, G, M]`` by threshold ``tau [G]``: ``mode="positive"`` keeps
    ``h >= tau and h > 0``, ``"ge"`` keeps ``h >= tau``, ``"nonzero"`` keeps ``h != 0`` (turns dense
    activations into the sparse layout). Returns ``(idx, vals)`` ``[N, G, K]``."""
    if mode not in _sel_torch.MODES:
        raise ValueError(f"compaction mode {mode!r}: use one of {_sel_torch.MODES}")
    tau = tau.to(h.device)
    if resolve_backend(h, backend) == "triton" and h.numel() > 0:
        from torchtitan_clt.kernels import select_triton

        idx = select_triton.compact(h.detach(), tau, mode)
    else:
        idx = _sel_torch.compact(h.detach(), tau, mode)
    return idx, _gather_vals(h, idx)


def batchtopk_select_ids(
    h: torch.Tensor, k_total: int, scope: str = "layer", positive: bool = True, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK on one process: ``h [N, L, F]`` -> ``(idx [N, L, K], tau [L])``, the ``k_total``
    largest per layer (``scope="layer"``) or over all layers (``"all"``); entries equal to the
    threshold are all kept; ``positive`` also drops entries <= 0 (BatchTopK of ReLU(h))."""
    if scope not in SCOPES:
        raise ValueError(f"batchtopk scope {scope!r}: use one of {SCOPES}")
    h = h.detach()
    if resolve_backend(h, backend) == "torch":
        return _sel_torch.batchtopk_select(h, k_total, scope, positive)
    tau = batchtopk_threshold(h, k_total, scope, backend)
    idx, _ = compact(h, tau, "positive" if positive else "ge", backend)
    return idx, tau


def batchtopk_select(
    h: torch.Tensor, k: int, scope: str = "layer", positive: bool = True, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK over this batch: ``h [N, L, F]`` -> ``(idx, vals [N, L, K], tau [L])``, the ``k*N``
    largest per layer (``scope="layer"``) or ``k*N*L`` over all layers (``"all"``)."""
    n, n_layers, _ = h.shape
    k_total = k * n * (n_layers if scope == "all" else 1)
    idx, tau = batchtopk_select_ids(h, k_total, scope, positive, backend)
    return idx, gather_selected(h, idx), tau


def gather_selected(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``vals [N, L, K]`` = h at ``idx`` (0 at padding); differentiable, straight-through to the
    selected pre-activations only."""
    return _gather_vals(h, idx)


# --------------------------------------------------------------------------- decoding
def _dense_by_density(idx: torch.Tensor, n_features: int, density_threshold: float | None) -> bool:
    thr = options().sparse_density_threshold if density_threshold is None else density_threshold
    # K / F bounds the active fraction from above without a host sync
    return n_features > 0 and idx.shape[-1] / n_features > thr


def sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    w: torch.Tensor,
    backend: str | None = None,
    density_threshold: float | None = None,
) -> torch.Tensor:
    """``out [N, D] = sum_j vals[n, j] * w[idx[n, j]]`` (fp32 accumulation), ``idx/vals [N, K]``,
    ``w [F, D]``. Differentiable in ``vals`` and ``w``. Runs dense above the density threshold."""
    if _dense_by_density(idx, w.shape[0], density_threshold):
        return _dec.decode_dense(idx, vals, w)
    if resolve_backend(w, backend) == "triton":
        return _dec.SparseDecodeTriton.apply(idx, vals, w)
    return _dec.decode_torch(idx, vals, w)


def sparse_grad_weight(
    idx: torch.Tensor,
    vals: torch.Tensor,
    g: torch.Tensor,
    n_features: int,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """``[F, D]``: sparse outer products ``sum vals[n, j] * g[n]`` into rows ``idx[n, j]`` (the
    weight gradient of ``sparse_decode``; also the sparse encoder's weight gradient, ``g = x``)."""
    if resolve_backend(g, backend) == "triton":
        from torchtitan_clt.kernels import decode_triton

        return decode_triton.decode_grad_weight(idx, vals, g, n_features, dtype)
    return _dec.grad_weight_torch(idx, vals, g, n_features, dtype)


def sparse_encoder_grads(
    idx: torch.Tensor, g_vals: torch.Tensor, x: torch.Tensor, n_features: int, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``h = W_enc x + b_enc`` when only the selected entries of h get gradient:
    ``idx, g_vals [N, L, K]``, ``x [N, L, d]`` -> ``(grad W_enc [L, F, d] fp32, grad b_enc [L, F])``,
    sparse outer products grouped by feature (never a dense ``[N, L, F]`` gradient)."""
    if resolve_backend(x, backend) != "triton":
        return _dec.encoder_grads_torch(idx, g_vals, x, n_features)
    from torchtitan_clt.kernels import decode_triton

    n_layers = idx.shape[1]
    g_w = torch.stack(
        [
            decode_triton.decode_grad_weight(idx[:, li], g_vals[:, li], x[:, li], n_features)
            for li in range(n_layers)
        ]
    )
    g_b = torch.zeros((n_layers, n_features), dtype=torch.float32, device=x.device)
    g_b.scatter_add_(
        1,
        idx.clamp(min=0).transpose(0, 1).reshape(n_layers, -1),
        torch.where(idx >= 0, g_vals, 0).float().transpose(0, 1).reshape(n_layers, -1),
    )
    return g_w, g_b


def clt_sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    w_dec: Sequence[torch.Tensor],
    b_dec: torch.Tensor,
    backend: str | None = None,
    density_threshold: float | None = None,
) -> torch.Tensor:
    """CLT decoder: ``y_hat[:, t] = b_dec[t] + sum_{s<=t} W_dec,s[:, t-s]^T a_s``.

    ``idx, vals [N, L, K]`` (source layer s = ``idx[:, s]``), ``w_dec[s] [F, L-s, d]`` (feature-major:
    one feature's whole write is one row of the view ``[F, (L-s)*d]``), ``b_dec [L, d]``.
    Returns ``[N, L, d]`` (fp32 when weights are bf16). Differentiable in vals, w_dec and b_dec."""
    n, n_layers, _ = idx.shape
    if len(w_dec) != n_layers:
        raise ValueError(f"clt_sparse_decode: {len(w_dec)} decoder tensors for {n_layers} layers")
    n_features = w_dec[0].shape[0]
    dense = _dense_by_density(idx, n_features, density_threshold)
    if not dense:
        if resolve_backend(w_dec[0], backend) == "triton":
            return _dec.CLTSparseDecodeTriton.apply(idx, vals, b_dec, *w_dec)
        return _dec.CLTSparseDecodeTorch.apply(idx, vals, b_dec, *w_dec)
    d = b_dec.shape[-1]
    out = b_dec.expand(n, n_layers, d)
    for s, w in enumerate(w_dec):
        contrib = _dec.decode_dense(idx[:, s], vals[:, s], w.reshape(n_features, -1)).view(n, n_layers - s, d)
        out = out + torch.nn.functional.pad(contrib, (0, 0, s, 0))
    return out


def plt_sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    w_dec: torch.Tensor,
    b_dec: torch.Tensor,
    backend: str | None = None,
    density_threshold: float | None = None,
) -> torch.Tensor:
    """PLT / SAE decoder: ``y_hat[:, l] = b_dec[l] + W_dec[l]^T a_l``; ``idx, vals [N, L, K]``,
    ``w_dec [L, F, d]``, ``b_dec [L, d]`` -> ``[N, L, d]``."""
    outs = [
        sparse_decode(idx[:, li], vals[:, li], w_dec[li], backend, density_threshold)
        for li in range(w_dec.shape[0])
    ]
    return torch.stack(outs, 1) + b_dec


def decoder_row_norms(w: torch.Tensor) -> torch.Tensor:
    """``w [F, ...]`` -> ``[F]`` norms of each feature's whole decoder row (CLT: concatenated over
    its targets), O(F*D) once per step; gather them at active entries, no dense [N, F] pass."""
    return w.reshape(w.shape[0], -1).float().norm(dim=1)


def norm_weighted(idx: torch.Tensor, vals: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``a * ||W_dec,i||`` at every entry, at least fp32: ``idx/vals [N, L, K]``, ``norms [L, F]`` ->
    ``[N, L, K]``, 0 at padding (the L1 sparsity term's summands; tanh of them, the tanh term's)."""
    n_of = norms.gather(1, idx.clamp(min=0).permute(1, 0, 2).reshape(norms.shape[0], -1))
    n_of = n_of.view(idx.shape[1], idx.shape[0], idx.shape[2]).permute(1, 0, 2)  # [N, L, K]
    return vals.float() * n_of * (idx >= 0)


def tanh_sparsity_sparse(
    idx: torch.Tensor, vals: torch.Tensor, norms: torch.Tensor, c: float = 1.0
) -> torch.Tensor:
    """``sum over active entries of tanh(c * a * ||W_dec,i||)`` per layer: ``idx/vals [N, L, K]``,
    ``norms [L, F]`` -> ``[L]`` (sum over tokens and features; divide by N for a mean)."""
    return torch.tanh(c * norm_weighted(idx, vals, norms)).sum(dim=(0, 2))


def sparse_to_dense(idx: torch.Tensor, vals: torch.Tensor, n_features: int) -> torch.Tensor:
    """``idx/vals [N, L, K]`` -> ``[N, L, F]`` (zeros elsewhere), differentiable through ``vals``."""
    n, n_layers, _ = idx.shape
    dense = torch.zeros((n, n_layers, n_features), dtype=vals.dtype, device=vals.device)
    return dense.scatter_add(2, idx.clamp(min=0), vals)
