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
from torchtitan_clt.models.common import LayerwiseTranscoder, check_norm_mode, new_param
from torchtitan_clt.models.init import Constant, Drawn, FirstTarget, RowNormalized, init_param_
from torchtitan_clt.protocols.transcoder import TranscoderArgs, parse_dtype


def decode_entries(
    flat: torch.Tensor, acts: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor
) -> torch.Tensor:
    """``[B, D]``: row b sums ``acts[b, f] * flat[f]`` over its entries ``(rows, feats)`` (rows
    ascending), one ``embedding_bag`` with per-sample weights: differentiable in ``flat`` and in
    ``acts`` at every listed entry, zeros included."""
    counts = torch.bincount(rows, minlength=acts.shape[0])
    return torch.nn.functional.embedding_bag(
        feats,
        flat,
        counts.cumsum(0) - counts,
        mode="sum",
        per_sample_weights=acts[rows, feats].to(flat.dtype),
    )


class CrossLayerTranscoder(LayerwiseTranscoder):
    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        L, F, d = args.n_layers, args.features_per_layer, args.d_out
        dtype = parse_dtype(args.dtype)
        self.W_dec = nn.ParameterList([new_param(F, L - s, d, dtype=dtype) for s in range(L)])

    def decode_selected(self, idx: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return kernels.clt_sparse_decode(idx, vals, list(self.W_dec), bias)

    def _decode_source(
        self, s: int, acts_s: torch.Tensor, support_s: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What source layer s writes: acts_s  # [B, F] -> [B, L−s, d_out] (no bias).

        Sparse activations (a trained JumpReLU, ReLU, eval-mode BatchTopK) take the sparse path:
        only the active features' rows of W_dec,s are read (``embedding_bag`` with per-sample
        weights), and W_dec,s gets sparse outer products in backward. ``support_s  # [B, F]``
        marks entries whose ∂L/∂a is needed though a = 0 (JumpReLU's threshold window): they
        are decoded with weight 0, so the gradient reaches them. Above
        ``kernels.sparse_density_threshold`` active fraction it runs the dense matmul."""
        W = self.W_dec[s]  # [F, L−s, d]
        flat = W.reshape(W.shape[0], -1)
        B = acts_s.shape[0]
        if B > 0:
            used = acts_s != 0 if support_s is None else (acts_s != 0) | support_s
            rows, feats = used.nonzero(as_tuple=True)  # row-major: rows ascending
            if rows.numel() <= kernels.options().sparse_density_threshold * acts_s.numel():
                return decode_entries(flat, acts_s, rows, feats).view(B, *W.shape[1:])
        return (acts_s.to(W.dtype) @ flat).view(B, *W.shape[1:])

    def decode_std(self, acts: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
        """acts  # [B, L, F] -> ŷ  # [B, L, d_out]; ``support`` see ``_decode_source``."""
        B, L = acts.shape[0], self.args.n_layers
        y = self.b_dec.expand(B, L, self.args.d_out).clone()  # [B, L, d]
        for s in range(L):
            y[:, s:] += self._decode_source(s, acts[:, s], None if support is None else support[:, s])
        return y

    def decoder_norms(self, mode: str = "concat") -> torch.Tensor:
        check_norm_mode(mode)
        if mode == "concat":
            norms = [torch.linalg.vector_norm(W, dim=(1, 2)) for W in self.W_dec]
        else:
            norms = [torch.linalg.vector_norm(W, dim=2).sum(dim=1) for W in self.W_dec]
        return torch.stack(norms)  # [L, F]

    def decoder_rows(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        return [(W, (1, 2)) for W in self.W_dec]  # a feature's writes to every later layer

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Decoder blocks W_dec,s→t ~ U(±1/sqrt(L·d_out)) (Ameisen et al. 2025, "Circuit
        Tracing", methods); with model.decoder_init_norm > 0 each feature's whole row (all its
        targets) is then scaled to that norm. Tied encoder: W_enc,s = the source's own block
        W_dec,s→s (its first target). Each rank draws only its shards (``models/init.py``)."""
        a = self.args
        L, F, d = a.n_layers, a.features_per_layer, a.d_out
        bound = 1.0 / math.sqrt(L * d)
        decoders = []
        for s in range(L):
            W = Drawn(seed, f"W_dec.{s}", (F, L - s, d), "uniform", bound)
            decoders.append(RowNormalized(W, 1, a.decoder_init_norm) if a.decoder_init_norm > 0 else W)
            init_param_(self.W_dec[s], decoders[s])
        init_param_(self.b_dec, Constant((L, d)))
        self._init_encoder(seed, FirstTarget(decoders))
        self._finish_init()

    @torch.no_grad()
    def _fold_into_weights(self, in_mean, in_scale, out_mean, out_scale) -> None:
        self._fold_encoder(in_mean, in_scale)
        for s, W in enumerate(self.W_dec):
            W.copy_((W.float() * out_scale[s:][None]).to(W.dtype))  # targets s..L-1
        self.b_dec.copy_((self.b_dec.float() * out_scale + out_mean).to(self.b_dec.dtype))


def build_clt(args: TranscoderArgs) -> CrossLayerTranscoder:
    return CrossLayerTranscoder(args)
