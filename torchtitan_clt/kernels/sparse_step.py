"""A self-contained sparse CLT training step: dense encoder matmul -> TopK / BatchTopK select ->
sparse decode -> losses on the sparse values. Also the same step with a dense decoder, for comparison.

Sparse path cost per token: encoder ``2*L*F*d`` FLOPs (forward only; its backward is sparse) plus
``k * sum_s (L-s) * d`` for the decoder, instead of ``F * sum_s (L-s) * d`` per pass for a dense
decoder. Backward needs ``x``, the indices and the weights, never ``h`` (unless a loss term reads
``h`` itself, as AuxK does; its gradient is then merged in and stays sparse while it is).

``CrossLayerTranscoder.forward_std`` (models/clt) trains TopK / BatchTopK through
``clt_sparse_forward``; ``out.idx / out.vals`` (``[B, L, K]``) are the sparse activations,
``out.to_dense(F)`` the ``[B, L, F]`` ones where a dense tensor is really needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.backend import options
from torchtitan_clt.kernels.collectives import sum_partials
from torchtitan_clt.kernels.layout_torch import one_thread
from torchtitan_clt.kernels.selection import Selection, select


class SparseEncode(torch.autograd.Function):
    """``x [N, L, d]``, ``W_enc [L, F, d]``, ``b_enc [L, F]`` -> ``(h [N, L, F], idx, vals [N, L, K],
    tau [L])``: the pre-activations and their selection (``sel``, by ``selection.select`` over
    ``group`` with ``batch_scale``; ``tau`` is NaN for TopK).

    Forward: ``h = W_enc x + b_enc`` (one batched matmul, stored ``[L, N, F]``), then select.
    Backward (straight-through to the selected pre-activations): the gradient at ``vals`` plus any
    that a loss term sent through ``h`` itself (AuxK); while that is sparse (below the density
    threshold), ``grad W_enc[l]`` is sparse outer products ``grad_vals x`` grouped by feature,
    ``grad b_enc`` a scatter-add, ``grad x`` a sparse decode through ``W_enc``: never a dense
    ``[N, L, F]`` matmul. A dense gradient at ``h`` (the pre-activation loss) takes the matmuls."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, sel: Selection, backend, group=None, batch_scale=1):
        xw = x.to(w_enc.dtype)  # an fp32 batch into bf16 weights: cast the batch, never the weights
        h = torch.baddbmm(b_enc.unsqueeze(1).to(w_enc.dtype), xw.transpose(0, 1), w_enc.transpose(1, 2))
        hp = h.permute(1, 0, 2)  # [N, L, F] view of the layer-major storage
        idx, tau = select(hp, sel, backend, group, batch_scale)
        vals = dispatch.gather_selected(hp, idx)
        ctx.save_for_backward(xw, w_enc)
        ctx.idx = idx  # the very tensor the decoder gets: its cached layout is reused in backward
        ctx.backend, ctx.x_dtype = backend, x.dtype
        ctx.set_materialize_grads(False)  # an unused h sends no gradient: no dense pass then
        ctx.mark_non_differentiable(idx, tau)
        return hp, idx, vals, tau

    @staticmethod
    def backward(ctx, g_h, _g_idx, g_vals, _g_tau):
        x, w_enc = ctx.saved_tensors
        idx = ctx.idx
        n, n_layers, _ = idx.shape
        n_features = w_enc.shape[1]
        if g_vals is not None:
            with one_thread(g_vals.device):
                g_vals = torch.where(
                    idx >= 0, g_vals, torch.zeros((), dtype=g_vals.dtype, device=g_vals.device)
                )
        if g_h is not None and not any(g_h.stride()) and not bool(g_h.reshape(-1)[:1].any()):
            g_h = None  # a broadcast zero: a term kept h in the graph with weight 0 (AuxK, none dead)
        if g_h is not None:  # a term read h itself: merge, then go sparse if the sum still is
            g = g_h.to(w_enc.dtype)
            if g_vals is not None:
                g = g.scatter_add(-1, idx.clamp(min=0), g_vals.to(g.dtype))
            thr = options().sparse_density_threshold
            if int(torch.count_nonzero(g)) > thr * g.numel():
                return (*_dense_encoder_grads(ctx, g, x, w_enc), *([None] * 4))
            idx, g_vals = dispatch.compact(g, torch.zeros(n_layers, device=g.device), "nonzero", ctx.backend)
        elif g_vals is None:
            return (None,) * 7
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_w, g_b = dispatch.sparse_encoder_grads(idx, g_vals, x, n_features, ctx.backend)
            g_w, g_b = g_w.to(w_enc.dtype), g_b.to(w_enc.dtype)
        if ctx.needs_input_grad[0]:
            g_x = torch.stack(
                [
                    dispatch.sparse_decode(
                        idx[:, li], g_vals[:, li], w_enc[li], ctx.backend, density_threshold=1.0
                    )
                    for li in range(n_layers)
                ],
                1,
            ).to(ctx.x_dtype)
        return g_x, g_w, g_b, None, None, None, None


def _dense_encoder_grads(ctx, g, x, w_enc):
    gl = g.permute(1, 0, 2)  # [L, N, F]
    g_x = torch.bmm(gl, w_enc).transpose(0, 1).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    g_w = torch.bmm(gl.transpose(1, 2), x.transpose(0, 1)) if ctx.needs_input_grad[1] else None
    g_b = gl.sum(1) if ctx.needs_input_grad[2] else None
    return g_x, g_w, g_b


@dataclass
class SparseCLTOutput:
    idx: torch.Tensor  # [N, L, K] int64 feature ids, -1 = padding
    vals: torch.Tensor  # [N, L, K] selected pre-activations (0 at padding), differentiable
    tau: torch.Tensor  # [L] this batch's BatchTopK thresholds (NaN for TopK)
    y_hat: torch.Tensor  # [N, L, d] reconstruction
    pre_acts: torch.Tensor | None = None  # [N, L, F] h, differentiable (a term using it stays sparse
    # in backward while its gradient is)

    def to_dense(self, n_features: int) -> torch.Tensor:
        """``[N, L, F]`` activations (differentiable through ``vals``)."""
        return dispatch.sparse_to_dense(self.idx, self.vals, n_features)

    def min_positive(self) -> torch.Tensor:
        """``[L]`` smallest kept positive value per layer (+inf if none): what a BatchTopK
        activation tracks to become a JumpReLU threshold at inference."""
        with one_thread(self.vals.device):
            v = self.vals.detach().float()
            v = torch.where((self.idx >= 0) & (v > 0), v, torch.full_like(v, float("inf")))
            return v.amin(dim=(0, 2)) if v.numel() else torch.full((self.idx.shape[1],), float("inf"))

    def l0(self) -> torch.Tensor:
        """``[L]`` mean active features per token."""
        return (self.idx >= 0).sum(dim=(0, 2)).float() / max(self.idx.shape[0], 1)


def sparse_forward(
    x: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    b_dec: torch.Tensor,
    sel: Selection,
    backend: str | None = None,
    group=None,
    batch_scale: int = 1,
    tp_group=None,
    extra: torch.Tensor | None = None,
) -> SparseCLTOutput:
    """Any layerwise family's forward, sparse end to end: encoder, ``select`` over ``group``, then
    ``decode(idx, vals, bias) -> [N, L, d]`` (the family's sparse decoder). ``tp_group``: features
    are sharded over these ranks; each decodes its own active features into a partial ŷ (zero
    bias), the partials are summed (identity backward: every rank computes the same loss) and
    ``b_dec`` is added once. ``extra  # [N, L, d]``: this rank's share of another term of ŷ (the
    skip path), added to the partial so that one reduction sums both."""
    h, idx, vals, tau = SparseEncode.apply(x, w_enc, b_enc, sel, backend, group, batch_scale)
    if tp_group is None:
        y_hat = decode(idx, vals, b_dec)
        if extra is not None:
            y_hat = y_hat + extra.to(y_hat.dtype)
    else:
        part = decode(idx, vals, torch.zeros_like(b_dec))
        if extra is not None:
            part = part + extra.to(part.dtype)
        y_hat = sum_partials(
            part.float() if part.dtype in (torch.bfloat16, torch.float16) else part, tp_group
        )
        y_hat = y_hat + b_dec.to(y_hat.dtype)
    return SparseCLTOutput(idx, vals, tau, y_hat, h)


def clt_sparse_forward(
    x: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: Sequence[torch.Tensor],
    b_dec: torch.Tensor,
    k: int,
    scope: str = "layer",
    positive: bool = True,
    backend: str | None = None,
    density_threshold: float | None = None,
    tp_group=None,
    select: str = "batchtopk",
    group=None,
    batch_scale: int = 1,
) -> SparseCLTOutput:
    """CLT forward with BatchTopK (or ``select="topk"``: TopK per token), sparse end to end.
    ``x [N, L, d_in]``, ``w_enc [L, F, d_in]``, ``b_enc [L, F]``, ``w_dec[s] [F, L-s, d_out]``,
    ``b_dec [L, d_out]``.

    ``tp_group``: tensor parallel over features. Each rank passes its shard of the features
    (``w_enc [L, F/tp, d]``, ``b_enc``, ``w_dec[s] [F/tp, L-s, d]``) and the full ``x``, ``b_dec``;
    ``idx`` is local to the shard, ``y_hat`` the full sum. ``group`` (default ``tp_group``): every
    rank holding a different part of ``h``, with ``batch_scale`` = global / local batch."""

    def decode(idx, vals, bias):
        return dispatch.clt_sparse_decode(idx, vals, w_dec, bias, backend, density_threshold)

    sel = Selection(select, k, scope, positive)
    group = tp_group if group is None else group
    return sparse_forward(x, w_enc, b_enc, decode, b_dec, sel, backend, group, batch_scale, tp_group)


def _losses(y_hat, y, sparsity, n):
    recon = (y_hat.float() - y.float()).pow(2).sum(dim=(1, 2)).mean()
    loss = recon + sparsity / max(n, 1)
    return loss, {"recon": recon.detach(), "sparsity": (sparsity / max(n, 1)).detach()}


def clt_sparse_loss(
    x,
    y,
    w_enc,
    b_enc,
    w_dec,
    b_dec,
    k: int,
    scope: str = "layer",
    lambda_sparsity: float = 0.0,
    tanh_c: float = 1.0,
    backend: str | None = None,
    density_threshold: float | None = None,
    tp_group=None,
):
    """``(loss, terms)``: squared error summed over layers and dims, mean over tokens, plus
    ``lambda * sum tanh(c * a * ||W_dec,i||) / N`` over the active entries only. With
    ``tp_group`` (see ``clt_sparse_forward``) the loss is the global one on every rank."""
    out = clt_sparse_forward(
        x, w_enc, b_enc, w_dec, b_dec, k, scope, True, backend, density_threshold, tp_group
    )
    sparsity = torch.zeros((), device=x.device)
    if lambda_sparsity:
        norms = torch.stack([dispatch.decoder_row_norms(w) for w in w_dec])  # [L, F]
        sparsity = lambda_sparsity * dispatch.tanh_sparsity_sparse(out.idx, out.vals, norms, tanh_c).sum()
        sparsity = sum_partials(sparsity, tp_group)
    return _losses(out.y_hat, y, sparsity, x.shape[0])


def clt_dense_loss(
    x,
    y,
    w_enc,
    b_enc,
    w_dec,
    b_dec,
    k: int,
    scope: str = "layer",
    lambda_sparsity: float = 0.0,
    tanh_c: float = 1.0,
):
    """The same step with dense activations ``[N, L, F]`` and a dense (matmul) decoder: the
    baseline the sparse step is measured against, and its reference in tests."""
    n, n_layers, _ = x.shape
    n_features = w_enc.shape[1]
    h = torch.baddbmm(b_enc.unsqueeze(1), x.transpose(0, 1), w_enc.transpose(1, 2)).permute(1, 0, 2)
    idx, _ = select(h, Selection("batchtopk", k, scope), backend="torch")
    acts = torch.zeros_like(h).scatter_add(-1, idx.clamp(min=0), dispatch.gather_selected(h, idx))
    y_hat = b_dec.expand(n, n_layers, b_dec.shape[-1])
    for s, w in enumerate(w_dec):
        contrib = (acts[:, s] @ w.reshape(n_features, -1)).view(n, n_layers - s, -1)
        y_hat = y_hat + torch.nn.functional.pad(contrib, (0, 0, s, 0))
    sparsity = torch.zeros((), device=x.device)
    if lambda_sparsity:
        norms = torch.stack([dispatch.decoder_row_norms(w) for w in w_dec])  # [L, F]
        sparsity = lambda_sparsity * torch.tanh(tanh_c * acts * norms[None]).sum()
    return _losses(y_hat, y, sparsity, n)
