"""Sparse decoding implementations behind ``dispatch``: torch fallback, dense switch, Triton autograd.

Sparse layout: ``idx [N, K]`` int64 (-1 = padding), ``vals [N, K]`` (0 at padding); ``W [F, D]``.
All three compute ``out[n] = sum_j vals[n, j] * W[idx[n, j]]`` with gradients for ``vals`` (dot
products at active entries only) and ``W`` (sparse outer products); padding gets no gradient.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# Entries per chunk in the torch grad-weight fallback: bounds its [chunk, D] temporary.
_TORCH_CHUNK_ELEMS = 1 << 24


def out_dtype(vals: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(vals.dtype, w.dtype)


# --------------------------------------------------------------------------- torch fallback
def _csr(idx: torch.Tensor, vals: torch.Tensor):
    """Padded ``[N, K]`` -> the valid entries in row order: ``(valid [N, K], rows [E], feats [E],
    vals [E], row_offsets [N+1])`` (one host sync on CUDA, none on CPU that matters)."""
    valid = idx >= 0
    counts = valid.sum(1)
    offsets = torch.zeros(idx.shape[0] + 1, dtype=torch.long, device=idx.device)
    offsets[1:] = counts.cumsum(0)
    rows = torch.repeat_interleave(torch.arange(idx.shape[0], device=idx.device), counts)
    return valid, rows, idx[valid], vals[valid], offsets


def _bags_by_feature(feats: torch.Tensor, rows: torch.Tensor, v: torch.Tensor, n_features: int):
    """Entries regrouped by feature: ``(rows_sorted, vals_sorted, feature_offsets [F])``."""
    order = torch.argsort(feats, stable=True)
    offsets = torch.searchsorted(feats[order], torch.arange(n_features, device=feats.device))
    return rows[order], v[order], offsets


def grad_weight_torch(idx: torch.Tensor, vals: torch.Tensor, g: torch.Tensor, n_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[F, D]``: sum over entries of ``vals[n, j] * g[n]`` into row ``idx[n, j]``. One
    ``embedding_bag`` over ``g`` with one bag per feature (empty bags give the zero rows)."""
    _, rows, feats, v, _ = _csr(idx, vals)
    g = g.contiguous()
    if feats.numel() == 0:
        return torch.zeros((n_features, g.shape[1]), dtype=dtype, device=g.device)
    rows_s, v_s, offsets = _bags_by_feature(feats, rows, v, n_features)
    out = F.embedding_bag(rows_s, g, offsets, mode="sum", per_sample_weights=v_s.to(g.dtype))
    return out.to(dtype)


def grad_vals_torch(idx: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: ``w[idx[n, j]] . g[n]`` at the valid entries only (a sampled matmul), 0 at padding."""
    valid, rows, feats, _, offsets = _csr(idx, idx)
    out = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    if feats.numel() == 0:
        return out
    if g.device.type == "cpu" and g.dtype == w.dtype and g.dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(offsets, feats, torch.zeros(feats.numel(), dtype=g.dtype),
                                              (idx.shape[0], w.shape[0]), check_invariants=False)
            dots = torch.sparse.sampled_addmm(pattern, g, w.T, beta=0.0).values()
    else:  # chunked gather-dot (bounded [chunk, D] temporaries)
        chunk = max(1, _TORCH_CHUNK_ELEMS // max(w.shape[1], 1))
        dots = torch.cat([(w[feats[c:c + chunk]].float() * g[rows[c:c + chunk]].float()).sum(-1)
                          for c in range(0, feats.numel(), chunk)])
    out[valid] = dots.float()
    return out


class SparseDecodeTorch(torch.autograd.Function):
    """Torch fallback: ``embedding_bag(mode="sum", per_sample_weights=vals)`` over the valid
    entries (padding skipped, not multiplied by zero); backward by a sampled matmul (grad vals) and
    an ``embedding_bag`` over ``grad_out`` grouped by feature (grad W)."""

    @staticmethod
    def forward(ctx, idx, vals, w):
        _, _, feats, v, offsets = _csr(idx, vals)
        ctx.save_for_backward(idx, vals, w)
        dt = out_dtype(vals, w)
        if feats.numel() == 0:
            return torch.zeros((idx.shape[0], w.shape[1]), dtype=dt, device=w.device)
        out = F.embedding_bag(feats, w, offsets[:-1], mode="sum", per_sample_weights=v.to(w.dtype))
        return out.to(dt)

    @staticmethod
    def backward(ctx, grad_out):
        idx, vals, w = ctx.saved_tensors
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:
            g_vals = grad_vals_torch(idx, w, grad_out.to(w.dtype)).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            g_w = grad_weight_torch(idx, vals, grad_out, w.shape[0], w.dtype)
        return None, g_vals, g_w


def decode_torch(idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return SparseDecodeTorch.apply(idx, vals, w)


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
