"""Matryoshka crosslayer transcoder: a CLT whose nested feature prefixes m_1 < … < m_G = F must
each reconstruct the targets on their own (Bussmann et al. 2025, "Learning Multi-Level Features
with Matryoshka Sparse Autoencoders", applied to a CLT).

The activations are the full model's (TopK / BatchTopK over all F features); the reconstruction
from prefix m uses only features [0, m) of every layer. ``forward_std`` returns all G
reconstructions (``TranscoderOutput.y_hat_prefixes``), built incrementally so that the G of them
cost one full decode; the reconstruction loss averages over them. At inference it is a plain CLT
(same parameters: ``W_enc  # [L, F, d_in]``, ``W_dec.{s}  # [F, L−s, d_out]``, ...).

Defaults: those of the CLT (decoder U(±1/sqrt(L·d)), tied encoder, b_dec = 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.kernels.collectives import sum_partials
from torchtitan_clt.models.clt.model import CrossLayerTranscoder
from torchtitan_clt.protocols.transcoder import TranscoderArgs, TranscoderOutput

MATRYOSHKA_ACTIVATIONS = ("topk", "batchtopk")


def matryoshka_prefixes(args: TranscoderArgs) -> list[int]:
    """The prefix sizes from ``args.extra["matryoshka_prefixes"]`` (empty: F/16, F/8, F/4, F/2, F),
    strictly increasing, ending at F."""
    F = args.features_per_layer
    given = [int(m) for m in args.extra.get("matryoshka_prefixes", [])]
    if not given:
        return sorted({max(1, F // 2**i) for i in range(5)})
    if any(m < 1 or m > F for m in given) or any(b <= a for a, b in zip(given, given[1:])):
        raise ConfigError(
            f"model.matryoshka_prefixes = {given} must be strictly increasing sizes in [1, "
            f"features_per_layer = {F}], e.g. [{F // 8}, {F // 4}, {F // 2}, {F}]."
        )
    return given if given[-1] == F else [*given, F]


class MatryoshkaCLT(CrossLayerTranscoder):
    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        self.prefixes = matryoshka_prefixes(args)

    def decode_prefixes_std(self, acts: torch.Tensor) -> list[torch.Tensor]:
        """acts  # [B, L, F] -> [ŷ from features [0, m_g) for each g], each [B, L, d_out].

        Under tensor parallelism (``mesh_groups.feature_shards`` > 1) ``acts`` and ``W_dec`` hold
        this rank's block of features: each prefix meets the block in a (possibly empty) band,
        the rank decodes its part of every prefix, and the G partial sums cross ranks as one
        stacked all-reduce before the bias is added."""
        B, L, d = acts.shape[0], self.args.n_layers, self.args.d_out
        F_loc = acts.shape[-1]
        g = self.mesh_groups
        split = g.feature_shards > 1 and g.sum_decoder_partials
        first = dist.get_rank(g.features) * F_loc if split else 0  # global id of local feature 0
        partial = torch.zeros(B, L, d, dtype=self.b_dec.dtype, device=acts.device)
        partials, lo = [], 0
        for m in self.prefixes:
            hi = min(max(m - first, 0), F_loc)  # the prefix's band [lo, hi) in local features
            for s in range(L):
                if hi == lo:
                    break
                W = self.W_dec[s][lo:hi]  # [hi−lo, L−s, d]: the rows of this prefix band
                a = acts[:, s, lo:hi].to(W.dtype)
                partial[:, s:] += (a @ W.reshape(hi - lo, -1)).view(B, L - s, d)
            partials.append(partial.clone())
            lo = hi
        ys = torch.stack(partials)  # [G, B, L, d]
        if split:
            ys = sum_partials(ys.float() if ys.dtype in (torch.bfloat16, torch.float16) else ys, g.features)
        ys = ys + self.b_dec.to(ys.dtype)
        return list(ys.unbind(0))

    def decoder_path(self) -> str:
        return "dense: the nested prefixes decode with matmuls (matryoshka_clt has no sparse step yet)"

    def forward_std(self, xs: torch.Tensor) -> TranscoderOutput:
        h = self.pre_acts(xs)
        a = self.activation(h)
        ys = [self._add_skip(y, xs) for y in self.decode_prefixes_std(a)]  # every prefix has the skip path
        return TranscoderOutput(
            pre_acts=h,
            acts=a,
            y_hat=ys[-1],
            dec_norms=None
            if self.args.decoder_norm == "none"
            else self.decoder_norms(self.args.decoder_norm),
            y_hat_prefixes=ys,
        )


def build_matryoshka_clt(args: TranscoderArgs) -> MatryoshkaCLT:
    if args.activation not in MATRYOSHKA_ACTIVATIONS:
        raise ConfigError(
            f"model.name = 'matryoshka_clt' needs a fixed-budget activation (its nested prefixes "
            f"compete for k active features): set model.activation to one of "
            f"{', '.join(MATRYOSHKA_ACTIVATIONS)} (got {args.activation!r}), or use model.name = 'clt'."
        )
    return MatryoshkaCLT(args)
