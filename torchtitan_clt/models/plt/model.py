"""Per-layer transcoder (PLT): layer l reads x_l and writes ŷ_l = W_dec,l a_l + b_dec,l.

Parameters: ``W_enc  # [L, F, d_in]``, ``b_enc  # [L, F]``, ``W_dec  # [L, F, d_out]``,
``b_dec  # [L, d_out]`` and the activation's own (e.g. ``activation.log_threshold``).
"""

from __future__ import annotations

import torch

from torchtitan_clt import kernels
from torchtitan_clt.models.common import LayerwiseTranscoder, check_norm_mode, new_param
from torchtitan_clt.models.init import Constant, Drawn, RowNormalized, init_param_
from torchtitan_clt.protocols.transcoder import TranscoderArgs, parse_dtype

# Decoder rows start as random directions of norm 0.1 with W_enc = W_decᵀ (Anthropic's
# "Circuits Updates – April 2024" SAE recipe), when model.decoder_init_norm = 0.
PLT_DECODER_INIT_NORM = 0.1


class PerLayerTranscoder(LayerwiseTranscoder):
    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        self.W_dec = new_param(
            args.n_layers, args.features_per_layer, args.d_out, dtype=parse_dtype(args.dtype)
        )

    def decode_std(self, acts: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
        """acts  # [B, L, F] -> ŷ  # [B, L, d_out]. Sparse below ``kernels.sparse_density_threshold``
        active fraction (the entries of ``support`` are decoded too, with weight 0, so that
        JumpReLU's threshold gradient reaches them), else one batched matmul."""
        used = acts != 0 if support is None else (acts != 0) | support
        if acts.numel() and int(used.sum()) <= kernels.options().sparse_density_threshold * acts.numel():
            idx, _ = kernels.compact(used.to(acts.dtype), torch.zeros(acts.shape[1]), "nonzero")
            return self.decode_selected(idx, kernels.dispatch.gather_selected(acts, idx), self.b_dec)
        acts = acts.to(self.W_dec.dtype)
        # [L, B, F] @ [L, F, d] -> [L, B, d]
        y = torch.bmm(acts.transpose(0, 1), self.W_dec).transpose(0, 1)
        return y + self.b_dec

    def decode_selected(self, idx: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return kernels.plt_sparse_decode(idx, vals, self.W_dec, bias, density_threshold=1.0)

    def decoder_norms(self, mode: str = "concat") -> torch.Tensor:
        check_norm_mode(mode)  # one target per feature: both modes agree
        return torch.linalg.vector_norm(self.W_dec, dim=-1)

    def decoder_rows(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        return [(self.W_dec, (2,))]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        a = self.args
        norm = a.decoder_init_norm or PLT_DECODER_INIT_NORM
        shape = (a.n_layers, a.features_per_layer, a.d_out)
        W_dec = RowNormalized(Drawn(seed, "W_dec", shape, "normal", 1.0), 2, norm)  # random directions
        init_param_(self.W_dec, W_dec)  # this rank's shard only (models/init.py)
        init_param_(self.b_dec, Constant((a.n_layers, a.d_out)))
        self._init_encoder(seed, W_dec)
        self._finish_init()

    @torch.no_grad()
    def _fold_into_weights(self, in_mean, in_scale, out_mean, out_scale) -> None:
        self._fold_encoder(in_mean, in_scale)
        self.W_dec.copy_((self.W_dec.float() * out_scale[:, None, :]).to(self.W_dec.dtype))
        self.b_dec.copy_((self.b_dec.float() * out_scale + out_mean).to(self.b_dec.dtype))


def build_plt(args: TranscoderArgs) -> PerLayerTranscoder:
    return PerLayerTranscoder(args)
