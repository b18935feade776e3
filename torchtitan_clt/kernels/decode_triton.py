"""Triton sparse decoding: ``out[n] (+)= sum_j vals[n, j] * W[idx[n, j]]`` and its two gradients.

Every kernel accumulates in fp32 whatever the storage dtype (bf16 weights are read as bf16).
- forward: one program per (token, block of D): gathers the token's active rows, scales, sums.
- grad vals: one program per (token, block of K): dot products of the active rows with grad_out.
- grad W: one program per (feature, block of D) over the entries sorted by feature, so each output
  row is written by exactly one program (no atomics, deterministic) and inactive rows get zeros in
  the same pass (no separate memset). No host sync anywhere.
Inputs are 2-D views ``[N, K]`` / ``[N, D]`` with any row stride and unit column stride, so the
CLT wrapper can pass ``out[:, s:, :]`` and ``W_dec,s.view(F, (L-s)*d)`` without copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchtitan_clt.kernels import launch

_BLOCK_D = 256
_BLOCK_K = 16
_BLOCK_E = 16


@triton.jit
def _fwd_kernel(
    idx_ptr,
    val_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    s_in,
    s_vn,
    s_wf,
    s_on,
    ACCUMULATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        i = tl.load(idx_ptr + n * s_in + offs_k, mask=kmask, other=-1)
        v = tl.load(val_ptr + n * s_vn + offs_k, mask=kmask, other=0.0).to(tl.float32)
        valid = i >= 0
        w = tl.load(
            w_ptr + i[:, None].to(tl.int64) * s_wf + offs_d[None, :],
            mask=valid[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * v[:, None], axis=0)
    o_ptrs = out_ptr + n * s_on + offs_d
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=dmask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _bwd_vals_kernel(
    idx_ptr, w_ptr, g_ptr, gv_ptr, K, D, s_in, s_wf, s_gn, s_gvn, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    i = tl.load(idx_ptr + n * s_in + offs_k, mask=kmask, other=-1)
    valid = i >= 0
    rows = w_ptr + i[:, None].to(tl.int64) * s_wf
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        g = tl.load(g_ptr + n * s_gn + offs_d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(rows + offs_d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(gv_ptr + n * s_gvn + offs_k, acc, mask=kmask)


@triton.jit
def _bwd_weight_kernel(
    start_ptr,
    end_ptr,
    rows_ptr,
    vals_ptr,
    g_ptr,
    gw_ptr,
    D,
    s_gn,
    s_gwf,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    start = tl.load(start_ptr + f)
    end = tl.load(end_ptr + f)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < end
        r = tl.load(rows_ptr + offs_e, mask=emask, other=0).to(tl.int64)
        v = tl.load(vals_ptr + offs_e, mask=emask, other=0.0).to(tl.float32)
        g = tl.load(
            g_ptr + r[:, None] * s_gn + offs_d[None, :], mask=emask[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(g * v[:, None], axis=0)
    tl.store(gw_ptr + f * s_gwf + offs_d, acc.to(gw_ptr.dtype.element_ty), mask=dmask)


def _check_rows(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(
                f"expected a 2-D view with unit column stride, got shape "
                f"{tuple(t.shape)} strides {t.stride()}"
            )


def _block_d(d: int) -> int:
    return min(_BLOCK_D, triton.next_power_of_2(max(d, 16)))


def decode_forward(
    idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor, out: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """``out [N, D] (+)= sparse(idx, vals) @ w``; idx/vals ``[N, K]``, w ``[F, D]``. In place."""
    _check_rows(idx, vals, w, out)
    n, k = idx.shape
    d = w.shape[1]
    if n == 0 or d == 0:
        return out
    bd = _block_d(d)
    _fwd_kernel[launch.grid(n, triton.cdiv(d, bd))](
        idx,
        vals,
        w,
        out,
        k,
        d,
        idx.stride(0),
        vals.stride(0),
        w.stride(0),
        out.stride(0),
        ACCUMULATE=accumulate,
        BLOCK_K=_BLOCK_K,
        BLOCK_D=bd,
    )
    return out


def decode_grad_vals(idx: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_vals [N, K]`` fp32 = rows ``w[idx]`` dotted with ``grad_out [N, D]``; 0 at padding."""
    _check_rows(idx, w, grad_out)
    n, k = idx.shape
    gv = torch.zeros((n, k), dtype=torch.float32, device=idx.device)
    if n == 0 or k == 0:
        return gv
    d = w.shape[1]
    _bwd_vals_kernel[launch.grid(n, triton.cdiv(k, _BLOCK_K))](
        idx,
        w,
        grad_out,
        gv,
        k,
        d,
        idx.stride(0),
        w.stride(0),
        grad_out.stride(0),
        gv.stride(0),
        BLOCK_K=_BLOCK_K,
        BLOCK_D=_block_d(d),
    )
    return gv


def group_by_feature(idx: torch.Tensor, vals: torch.Tensor, n_features: int):
    """Entries sorted by feature: ``(start [F], end [F], rows [E], vals [E])``; padding (-1) sorts
    first and is skipped by starting feature 0 after it. Sort + searchsorted, no host sync."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    keys, order = torch.sort(flat, stable=True)
    rows = torch.div(order, max(k, 1), rounding_mode="floor").to(torch.int32)
    v = vals.reshape(-1).float()[order]
    feats = torch.arange(n_features + 1, device=idx.device, dtype=keys.dtype)
    bounds = torch.searchsorted(keys, feats)  # first entry with id >= f
    return bounds[:-1].contiguous(), bounds[1:].contiguous(), rows, v


def decode_grad_weight(
    idx: torch.Tensor,
    vals: torch.Tensor,
    grad_out: torch.Tensor,
    n_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``grad_W [F, D]`` = sum over entries of ``vals * grad_out[row]`` into row ``idx``; zeros
    elsewhere. ``grad_out [N, D]`` may be a strided view."""
    _check_rows(grad_out)
    d = grad_out.shape[1]
    gw = torch.empty((n_features, d), dtype=dtype, device=grad_out.device)
    if n_features == 0 or d == 0:
        return gw
    start, end, rows, v = group_by_feature(idx, vals, n_features)
    bd = _block_d(d)
    _bwd_weight_kernel[launch.grid(n_features, triton.cdiv(d, bd))](
        start,
        end,
        rows,
        v,
        grad_out,
        gw,
        d,
        grad_out.stride(0),
        gw.stride(0),
        BLOCK_E=_BLOCK_E,
        BLOCK_D=bd,
    )
    return gw
