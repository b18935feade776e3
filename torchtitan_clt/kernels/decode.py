"""Sparse decoding implementations behind ``dispatch``: torch fallback, dense switch, Triton autograd.

Sparse layout: ``idx [N, K]`` int64 (-1 = padding), ``vals [N, K]`` (0 at padding); ``W [F, D]``.
All three compute ``out[n] = sum_j vals[n, j] * W[idx[n, j]]`` with gradients for ``vals`` (dot
products at active entries only) and ``W`` (sparse outer products); padding gets no gradient.
"""

from __future__ import annotations

import torch

from torchtitan_clt.kernels.layout_torch import Layout, one_thread


def out_dtype(vals: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """Decoder outputs are at least fp32 (bf16 weights and values still give an fp32 result)."""
    return torch.promote_types(torch.promote_types(vals.dtype, w.dtype), torch.float32)


# --------------------------------------------------------------------------- torch fallback
class SparseDecodeTorch(torch.autograd.Function):
    """Torch fallback: ``embedding_bag(mode="sum", per_sample_weights=vals)`` over the valid
    entries (padding skipped, not multiplied by zero); backward by a sampled matmul (grad vals) and
    an ``embedding_bag`` over ``grad_out`` with one bag per feature (grad W)."""

    @staticmethod
    def forward(ctx, idx, vals, w):
        lay = Layout.build(idx[:, None], w.shape[0])
        vals_e = lay.flat(vals[:, None])
        ctx.save_for_backward(idx, vals_e, w)
        ctx.lay = lay
        return lay.decode(0, vals_e, w).to(out_dtype(vals, w))

    @staticmethod
    def backward(ctx, grad_out):
        idx, vals_e, w = ctx.saved_tensors
        lay = ctx.lay
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:
            g_e = lay.from_feature_order(lay.grad_vals(0, w, grad_out.to(w.dtype)))
            g_vals = lay.unflat(g_e, idx.shape[0], idx.shape[1])[:, 0].to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            g_w = lay.grad_weight(0, lay.by_feature_order(vals_e), grad_out.to(w.dtype))
        return None, g_vals, g_w


class CLTSparseDecodeTorch(torch.autograd.Function):
    """Torch fallback of the CLT decoder (same contract as ``CLTSparseDecodeTriton``): the entry
    lists are built once for all source layers; one ``embedding_bag`` per source layer."""

    @staticmethod
    def forward(ctx, idx, vals, b_dec, *w_list):
        n, n_layers, k = idx.shape
        d = b_dec.shape[-1]
        lay = Layout.of(idx, w_list[0].shape[0])
        vals_e = lay.flat(vals)
        dt = torch.promote_types(out_dtype(vals, w_list[0]), b_dec.dtype)
        out = b_dec.to(dt).expand(n, n_layers, d).contiguous()
        flat = out.view(n, n_layers * d)
        for s, w in enumerate(w_list):
            flat[:, s * d :] += lay.decode(s, vals_e, w.reshape(w.shape[0], -1))
        ctx.save_for_backward(idx, lay.by_feature_order(vals_e), *w_list)
        ctx.lay, ctx.d, ctx.vals_dtype = lay, d, vals.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        idx, vals_bf, *w_list = ctx.saved_tensors
        lay, d = ctx.lay, ctx.d
        n, n_layers, k = idx.shape
        g = grad_out.contiguous().view(n, n_layers * d)
        g_vals, g_ws, g_es = None, [], []
        for s, w in enumerate(w_list):
            w2 = w.reshape(w.shape[0], -1)
            gs = g[:, s * d :].to(w.dtype)
            if ctx.needs_input_grad[1]:
                g_es.append(lay.grad_vals(s, w2, gs))
            g_ws.append(lay.grad_weight(s, vals_bf, gs).view_as(w) if ctx.needs_input_grad[3 + s] else None)
        if ctx.needs_input_grad[1]:  # by-feature order per layer -> entry order -> [N, L, K]
            g_vals = lay.unflat(lay.from_feature_order(torch.cat(g_es)), n, k).to(ctx.vals_dtype)
        g_b = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return (None, g_vals, g_b, *g_ws)


def decode_torch(idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return SparseDecodeTorch.apply(idx, vals, w)


def grad_weight_torch(
    idx: torch.Tensor,
    vals: torch.Tensor,
    g: torch.Tensor,
    n_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[F, D]``: sum over entries of ``vals[n, j] * g[n]`` into row ``idx[n, j]``."""
    lay = Layout.build(idx[:, None], n_features)
    return lay.grad_weight(0, lay.by_feature_order(lay.flat(vals[:, None])), g).to(dtype)


def encoder_grads_torch(idx: torch.Tensor, g_vals: torch.Tensor, x: torch.Tensor, n_features: int):
    """Sparse encoder backward: ``(grad W_enc [L, F, d], grad b_enc [L, F])`` from the gradient at
    the selected pre-activations ``g_vals [N, L, K]`` and the inputs ``x [N, L, d]``."""
    n_layers = idx.shape[1]
    lay = Layout.of(idx, n_features)
    g_e = lay.flat(g_vals)
    g_w = lay.grad_weight_all(lay.by_feature_order(g_e), x)
    dt = torch.promote_types(g_e.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    with one_thread(x.device):
        g_b = torch.zeros(n_layers * n_features, dtype=dt, device=x.device)
        g_b.index_add_(0, lay.layer_of * n_features + lay.feats, g_e.to(dt))
    return g_w, g_b.view(n_layers, n_features)


def decode_dense(idx: torch.Tensor, vals: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scatter to dense ``[N, F]`` then matmul: the density switch's path (cheaper when many
    features are active, e.g. early JumpReLU training)."""
    n, _ = idx.shape
    valid = idx >= 0
    dt = out_dtype(vals, w)
    weights = torch.where(valid, vals, torch.zeros((), dtype=vals.dtype, device=vals.device)).to(dt)
    acts = torch.zeros((n, w.shape[0]), dtype=dt, device=vals.device)
    acts = acts.scatter_add(1, idx.clamp(min=0), weights)  # differentiable w.r.t. weights
    return (acts.to(w.dtype) @ w).to(dt)  # the matmul in the weights' dtype: never copy W up


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
            dt.decode_forward(
                idx[:, s], vals[:, s], w.reshape(w.shape[0], -1), flat[:, s * d :], accumulate=True
            )
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
            gs = g[:, s * d :]
            if g_vals is not None:
                g_vals[:, s] = dt.decode_grad_vals(idx[:, s], w2, gs)
            if ctx.needs_input_grad[3 + s]:
                g_ws.append(
                    dt.decode_grad_weight(idx[:, s], vals[:, s], gs, w.shape[0], dtype=w.dtype).view_as(w)
                )
            else:
                g_ws.append(None)
        g_b = grad_out.sum(0) if ctx.needs_input_grad[2] else None
        return (None, g_vals, g_b, *g_ws)
