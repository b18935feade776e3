"""Sparse decoding implementations behind ``dispatch``: torch fallback, dense switch, Triton autograd.

Sparse layout: ``idx [N, K]`` int64 (-1 = padding), ``vals [N, K]`` (0 at padding); ``W [F, D]``.
All three compute ``out[n] = sum_j vals[n, j] * W[idx[n, j]]`` with gradients for ``vals`` (dot
products at active entries only) and ``W`` (sparse outer products); padding gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Entries per chunk in the torch grad-weight fallback: bounds its [chunk, D] temporary.
_TORCH_CHUNK_ELEMS = 1 << 24


def out_dtype(vals: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(vals.dtype, w.dtype)


# --------------------------------------------------------------------------- torch fallback
def decode_torch(idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``embedding_bag(mode="sum", per_sample_weights=vals)``; autograd gives both gradients."""
    n, k = idx.shape
    if k == 0:
        return (vals.sum() * 0 + w.sum() * 0).to(out_dtype(vals, w)).expand(n, w.shape[1]).clone()
    valid = idx >= 0
    weights = torch.where(valid, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    out = F.embedding_bag(idx.clamp(min=0), w, per_sample_weights=weights.to(w.dtype), mode="sum")
    return out.to(out_dtype(vals, w))


def decode_dense(idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scatter to dense ``[N, F]`` then matmul: the density switch's path (cheaper when many
    features are active, e.g. early JumpReLU training)."""
    n, _ = idx.shape
    valid = idx >= 0
    dt = out_dtype(vals, w)
    weights = torch.where(valid, vals, torch.zeros((), dtype=vals.dtype, device=vals.device)).to(dt)
    acts = torch.zeros((n, w.shape[0]), dtype=dt, device=vals.device)
    acts = acts.scatter_add(1, idx.clamp(min=0), weights)  # differentiable w.r.t. weights
    return acts @ w.to(dt)


def grad_weight_torch(idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, n_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[F, D]``: sum over entries of ``vals[n, j] * g[n]`` into row ``idx[n, j]`` (index_add)."""
    n, k = idx.shape
    d = g.shape[1]
    gw = torch.zeros((n_features, d), dtype=torch.float32, device=g.device)
    valid = idx >= 0
    rows = torch.arange(n, device=g.device)[:, None].expand(n, k)[valid]
    feats = idx[valid]
    v = vals[valid].float()
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(d, 1))
    for c in range(0, feats.numel(), chunk):
        sl = slice(c, c + chunk)
        gw.index_add_(0, feats[sl], g[rows[sl]].float() * v[sl, None])
    return gw.to(dtype)


# --------------------------------------------------------------------------- Triton autograd
class SparseDecodeTriton(torch.autograd.Function):
    """``[N, D]`` = sparse(idx, vals) @ W via the Triton kernels."""

    @staticmethod
    def forward(ctx, idx, vals, w):
        from torchtitan_clt.kernels import decode_triton as dt

        out = torch.empty((idx.shape[0], w.shape[1]), dtype=out_dtype(vals, w), device=w.device)
        dt.decode_forward(idx, vals, w, out, accumulate=False)
        ctx.save_for_backward(idx, vals, w)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from torchtitan_clt.kernels import decode_triton as dt

        idx, vals, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:
            g_vals = dt.decode_grad_vals(idx, w, grad_out).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            g_w = dt.decode_grad_weight(idx, vals, grad_out, w.shape[0], dtype=w.dtype)
        return None, g_vals, g_w


class CLTSparseDecodeTriton(torch.autograd.Function):
    """``y_hat [N, L, d] = b_dec + sum_{s<=t} W_dec,s->t a_s`` from ``idx/vals [N, L, K]`` and
    feature-major ``W_dec,s [F, L-s, d]``; each source is one kernel launch on the row view
    ``[F, (L-s)*d]`` accumulating into ``out[:, s:, :]`` (fp32)."""

    @staticmethod
    def forward(ctx, idx, vals, b_dec, *w_list):
        from torchtitan_clt.kernels import decode_triton as dt

        n, n_layers, _ = idx.shape
        d = b_dec.shape[-1]
        out = b_dec.float().expand(n, n_layers, d).contiguous()  # [N, L, d] fp32 accumulator
        flat = out.view(n, n_layers * d)
        for s, w in enumerate(w_list):
            dt.decode_forward(idx[:, s], vals[:, s], w.reshape(w.shape[0], -1), flat[:, s * d:],
                              accumulate=True)
        ctx.save_for_backward(idx, vals, *w_list)
        ctx.d = d
        dtype = out_dtype(vals, w_list[0]) if w_list else vals.dtype
        return out.to(torch.promote_types(dtype, b_dec.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        from torchtitan_clt.kernels import decode_triton as dt

        idx, vals, *w_list = ctx.saved_tensors
        n, n_layers, k = idx.shape
        d = ctx.d
        g = grad_out.contiguous().view(n, n_layers * d)
        g_vals = torch.zeros_like(vals) if ctx.needs_input_grad[1] else None
        g_ws = []
        for s, w in enumerate(w_list):
            w2 = w.reshape(w.shape[0], -1)
            gs = g[:, s * d:]
            if g_vals is not None:
                g_vals[:, s] = dt.decode_grad_vals(idx[:, s], w2, gs)
            if ctx.needs_input_grad[3 + s]:
                g_ws.append(dt.decode_grad_weight(idx[:, s], vals[:, s], gs, w.shape[0],
                                                  dtype=w.dtype).view_as(w))
            else:
                g_ws.append(None)
        g_b = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return (None, g_vals, g_b, *g_ws)
