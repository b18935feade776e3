"""Crosslayer transcoder (CLT): ŷ_t = Σ_{s≤t} W_dec,s→t a_s + b_dec,t.

Decoder storage is feature-major per source layer: ``W_dec[s]  # [F, L−s, d_out]`` (parameter
``W_dec.{s}``), so one active feature's whole write to every later layer is one contiguous row.
Encoders are per layer, as in the PLT: ``W_enc  # [L, F, d_in]``, ``b_enc  # [L, F]``;
``b_dec  # [L, d_out]`` is the bias of each target layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchtitan_clt import kernels
from torchtitan_clt.kernels.sparse_step import clt_sparse_forward
from torchtitan_clt.models.activations import BatchTopK, TopK
from torchtitan_clt.models.common import (
    LayerwiseTranscoder,
    check_norm_mode,
    chunked_rows,
    copy_full_,
    is_dtensor,
    new_param,
    normalize_rows,
    uniform,
)
from torchtitan_clt.protocols.transcoder import TranscoderArgs, TranscoderOutput, parse_dtype


class CrossLayerTranscoder(LayerwiseTranscoder):
    sparse_forward = True
    """Train TopK / BatchTopK through the sparse step (``forward_std``); False keeps the dense
    activations of the base class (benchmarks compare the two; the results are the same)."""

    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        L, F, d = args.n_layers, args.features_per_layer, args.d_out
        dtype = parse_dtype(args.dtype)
        self.W_dec = nn.ParameterList([new_param(F, L - s, d, dtype=dtype) for s in range(L)])

    def _sparse_selection(self) -> tuple[str, str] | None:
        """``(select, scope)`` when ``forward_std`` can run sparse end to end: TopK, or BatchTopK
        in training (in eval it is JumpReLU), on one process (the distributed activations choose
        over ranks: dense path), with ``k / F`` under ``kernels.sparse_density_threshold``."""
        act, F = self.activation, self.args.features_per_layer
        if not self.sparse_forward:
            return None
        if type(act) is BatchTopK and self.training:
            select = ("batchtopk", act.scope)
        elif type(act) is TopK:
            select = ("topk", "layer")
        else:
            return None
        if is_dtensor(self.W_enc) or act.k > kernels.options().sparse_density_threshold * F:
            return None
        return select

    def forward_std(self, xs: torch.Tensor) -> TranscoderOutput:
        """TopK / BatchTopK train sparse: encoder matmul, selection straight to ``idx, vals [B, L, K]``,
        the sparse CLT decoder (``kernels.clt_sparse_decode``, backend from ``--kernels.backend``),
        and a sparse encoder backward (``kernels.sparse_step``). ``acts`` is still given dense
        (metrics, sparsity terms; differentiable through the selected values) and ``pre_acts``
        stays differentiable (AuxK): gradients sent through either reach the encoder sparsely while
        they are sparse. Otherwise (JumpReLU, ReLU, dense activations, tensor parallel) the dense
        path of the base class."""
        plan = self._sparse_selection()
        if plan is None:
            return super().forward_std(xs)
        select, scope = plan
        act, F = self.activation, self.args.features_per_layer
        out = clt_sparse_forward(
            xs, self.W_enc, self.b_enc, list(self.W_dec), self.b_dec, min(act.k, F), scope, select=select
        )
        if self.training:
            min_pos = out.min_positive()  # [L]
            act._observe(min_pos.amin().expand(len(min_pos)) if scope == "all" else min_pos)
        return TranscoderOutput(
            pre_acts=out.pre_acts,
            acts=out.to_dense(F),
            y_hat=out.y_hat,
            dec_norms=None
            if self.args.decoder_norm == "none"
            else self.decoder_norms(self.args.decoder_norm),
        )

    def _decode_source(self, s: int, acts_s: torch.Tensor) -> torch.Tensor:
        """What source layer s writes: acts_s  # [B, F] -> [B, L−s, d_out] (no bias).

        Sparse activations (TopK, BatchTopK, a trained JumpReLU) take the sparse path: only the
        active features' rows of W_dec,s are read (``embedding_bag`` with per-sample weights), and
        W_dec,s gets sparse outer products in backward. Above
        ``kernels.sparse_density_threshold`` active fraction it runs the dense matmul."""
        W = self.W_dec[s]  # [F, L−s, d]
        flat = W.reshape(W.shape[0], -1)
        B = acts_s.shape[0]
        if not is_dtensor(W) and B > 0:
            rows, feats = acts_s.nonzero(as_tuple=True)  # row-major: rows ascending
            if rows.numel() <= kernels.options().sparse_density_threshold * acts_s.numel():
                counts = torch.bincount(rows, minlength=B)
                out = torch.nn.functional.embedding_bag(
                    feats,
                    flat,
                    counts.cumsum(0) - counts,
                    mode="sum",
                    per_sample_weights=acts_s[rows, feats].to(flat.dtype),
                )
                return out.view(B, *W.shape[1:])
        return (acts_s.to(W.dtype) @ flat).view(B, *W.shape[1:])

    def decode_std(self, acts: torch.Tensor) -> torch.Tensor:
        B, L = acts.shape[0], self.args.n_layers
        y = self.b_dec.expand(B, L, self.args.d_out).clone()  # [B, L, d]
        for s in range(L):
            y[:, s:] += self._decode_source(s, acts[:, s])
        return y

    def decoder_norms(self, mode: str = "concat") -> torch.Tensor:
        check_norm_mode(mode)
        if mode == "concat":
            norms = [torch.linalg.vector_norm(W, dim=(1, 2)) for W in self.W_dec]
        else:
            norms = [torch.linalg.vector_norm(W, dim=2).sum(dim=1) for W in self.W_dec]
        return torch.stack(norms)  # [L, F]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Decoder blocks W_dec,s→t ~ U(±1/sqrt(L·d_out)) (Ameisen et al. 2025, "Circuit
        Tracing", methods); with model.decoder_init_norm > 0 each feature's whole row (all its
        targets) is then scaled to that norm. Tied encoder: W_enc,s = the source's own block
        W_dec,s→s (its first target)."""
        a = self.args
        L, F, d = a.n_layers, a.features_per_layer, a.d_out
        bound = 1.0 / math.sqrt(L * d)
        own_blocks = []
        for s in range(L):
            W = chunked_rows(seed, f"W_dec.{s}", (F, L - s, d), lambda g, sh: uniform(g, sh, bound))
            if a.decoder_init_norm > 0:
                W = normalize_rows(W, a.decoder_init_norm)
            copy_full_(self.W_dec[s], W)
            own_blocks.append(W[:, 0].clone())
            del W
        copy_full_(self.b_dec, torch.zeros(L, d))
        self._init_encoder(seed, lambda i: own_blocks[i])
        self._finish_init()

    @torch.no_grad()
    def _fold_into_weights(self, in_mean, in_scale, out_mean, out_scale) -> None:
        self._fold_encoder(in_mean, in_scale)
        for s, W in enumerate(self.W_dec):
            W.copy_((W.float() * out_scale[s:][None]).to(W.dtype))  # targets s..L-1
        self.b_dec.copy_((self.b_dec.float() * out_scale + out_mean).to(self.b_dec.dtype))


def build_clt(args: TranscoderArgs) -> CrossLayerTranscoder:
    return CrossLayerTranscoder(args)
