"""Mixture of linear transforms (MOLT): ŷ_l = Σ_j g_j U_j (V_j x_l + c_j) + b_l.

Sparsely gated low-rank transforms in groups of ranks (e.g. ranks 512/256/128/64/32 with counts
N/2N/4N/8N/16N); the gates g = act(W_enc x + b_enc) are the "features" (acts  # [B, L, N], N the
total number of transforms), so every activation and loss term applies to them unchanged. A
transform's decoder norm is ‖U_j V_j‖_F, taken from r×r Gram matrices:
‖U V‖_F² = tr((UᵀU)(V Vᵀ)), never forming the d_out×d_in product.

Parameters per group g of rank r and count n (``U.{g}``, ``V.{g}``: one transform's rows are one
contiguous block, as a feature's decoder row is elsewhere):
``V.{g}  # [L, n, r, d_in]`` (V_j), ``U.{g}  # [L, n, r, d_out]`` (U_jᵀ), and a frozen
``V_bias.{g}  # [L, n, r]`` (c_j): 0 in training, it is where folding puts the input mean
(a gated transform of centered inputs has an input-dependent constant, so it cannot go in b_l).
Gates: ``W_enc  # [L, N, d_in]``, ``b_enc  # [L, N]``; output bias ``b_dec  # [L, d_out]``.

Defaults: gate rows random directions of norm 0.1, b_enc = 0; V_j ~ N(0, 1/d_in), U_j random and
rescaled so that ‖U_j V_j‖_F = 1 (``model.decoder_init_norm`` overrides); b_dec = 0; JumpReLU
gates (Anthropic, "Sparse mixtures of linear transforms", Circuits Updates 2025).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.models.common import LayerwiseTranscoder, check_norm_mode, grad_support_of, new_param
from torchtitan_clt.models.init import Constant, Drawn, RowNormalized, TransformScaled, init_param_
from torchtitan_clt.protocols.transcoder import TranscoderArgs, TranscoderOutput, parse_dtype

MOLT_GATE_INIT_NORM = 0.1
MOLT_TRANSFORM_INIT_NORM = 1.0
# A group runs its sparse path (only the transforms some token of the batch gates on) when at
# most this fraction of its transforms is active anywhere in the batch; dense matmuls otherwise.
MOLT_SPARSE_BELOW = 0.25


def molt_groups(args: TranscoderArgs) -> list[tuple[int, int]]:
    """[(rank, count)] per group, from ``args.extra`` (``molt_ranks``, ``molt_counts``)."""
    F = args.features_per_layer
    ranks = [int(r) for r in args.extra.get("molt_ranks", [512, 256, 128, 64, 32])]
    counts = [int(c) for c in args.extra.get("molt_counts", [])]
    if not ranks or any(r < 1 for r in ranks):
        raise ConfigError(f"model.molt_ranks = {ranks} must be a non-empty list of positive ranks.")
    if not counts:
        G = len(ranks)
        n = F // (2**G - 1)
        if n < 1:
            raise ConfigError(
                f"model.features_per_layer = {F} is too small for {G} MOLT groups with doubling "
                f"counts (needs at least {2**G - 1}); raise it or set model.molt_counts."
            )
        counts = [n * 2**g for g in range(G - 1)]
        counts.append(F - sum(counts))
    if len(counts) != len(ranks) or any(c < 1 for c in counts) or sum(counts) != F:
        raise ConfigError(
            f"model.molt_counts = {counts} must give one positive count per rank in "
            f"model.molt_ranks = {ranks}, summing to model.features_per_layer = {F}."
        )
    return list(zip(ranks, counts))


class MixtureOfLinearTransforms(LayerwiseTranscoder):
    decode_needs_input = True
    cross_layer = False  # target l reads x_l only (metrics.splice splices it layer by layer)

    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        self.groups = molt_groups(args)
        L, dtype = args.n_layers, parse_dtype(args.dtype)
        self.U = nn.ParameterList([new_param(L, n, r, args.d_out, dtype=dtype) for r, n in self.groups])
        self.V = nn.ParameterList([new_param(L, n, r, args.d_in, dtype=dtype) for r, n in self.groups])
        self.V_bias = nn.ParameterList([new_param(L, n, r, dtype=dtype) for r, n in self.groups])
        for c in self.V_bias:
            c.requires_grad_(False)

    # --- decoding: Σ_j g_j U_j (V_j x + c_j) + b ------------------------------------------------
    def decode_std(
        self, acts: torch.Tensor, xs: torch.Tensor | None = None, used: torch.Tensor | None = None
    ) -> torch.Tensor:
        """acts (gates)  # [B, L, N], xs  # [B, L, d_in] standardized -> ŷ  # [B, L, d_out].

        The sparse path computes only the transforms some entry of ``used  # [B, L, N]`` bool
        (default: the non-zero gates) selects; the gradient of a gate is exact there and 0 for a
        transform left out (as in the sparse decoders of kernels/)."""
        if xs is None:
            raise ValueError("a MOLT's output depends on its input: call decode_std(acts, xs).")
        used = acts != 0 if used is None else used
        B, L = acts.shape[:2]
        xl = xs.to(self.W_enc.dtype).transpose(0, 1)  # [L, B, d_in]
        y = torch.zeros(L, B, self.args.d_out, dtype=xl.dtype, device=xl.device)
        lo = 0
        for g, U in enumerate(self.U):
            n = U.shape[1]  # this rank's transforms of the group (all of them on one device)
            gate = acts[..., lo : lo + n].to(xl.dtype).transpose(0, 1)  # [L, B, n]
            lo += n
            on = used[..., lo - n : lo].any(0)  # [L, n] transforms some token uses
            if float(on.float().mean()) <= MOLT_SPARSE_BELOW:
                y = y + self._group_sparse(g, gate, xl, on)
            else:
                y = y + self._group_dense(g, gate, xl)
        return y.transpose(0, 1) + self.b_dec

    def _group_dense(self, g: int, gate: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        U, V, c = self.U[g], self.V[g], self.V_bias[g]
        L, n, r, _ = V.shape
        z = torch.bmm(xl, V.reshape(L, n * r, -1).transpose(1, 2))  # [L, B, n·r]
        z = (z.view(L, -1, n, r) + c[:, None]) * gate[..., None]
        return torch.bmm(z.reshape(L, -1, n * r), U.reshape(L, n * r, -1))  # [L, B, d_out]

    def _group_sparse(self, g: int, gate: torch.Tensor, xl: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        U, V, c = self.U[g], self.V[g], self.V_bias[g]
        outs = []
        for layer in range(V.shape[0]):
            idx = on[layer].nonzero().flatten()  # [a]
            a, r = idx.numel(), V.shape[2]
            if a == 0:
                outs.append(torch.zeros(xl.shape[1], U.shape[-1], dtype=xl.dtype, device=xl.device))
                continue
            Va = V[layer].index_select(0, idx).reshape(a * r, -1)  # [a·r, d_in]
            Ua = U[layer].index_select(0, idx).reshape(a * r, -1)  # [a·r, d_out]
            z = (xl[layer] @ Va.T).view(-1, a, r) + c[layer].index_select(0, idx)
            z = z * gate[layer].index_select(1, idx)[..., None]  # [B, a, r]
            outs.append(z.reshape(-1, a * r) @ Ua)
        return torch.stack(outs)

    def decoder_path(self) -> str:
        return "sparse: each layer applies only the transforms whose gate is open"

    def feature_segments(self) -> list[int]:
        """The feature axis as consecutive segments, one per group of transforms: each group's
        ``U`` / ``V`` is its own tensor, so tensor parallelism shards every segment over the ranks
        (``distributed/tensor_parallel.py`` moves the gates between that layout and the
        contiguous one of the encoder)."""
        return [n for _, n in self.groups]

    def forward_std(self, xs: torch.Tensor) -> TranscoderOutput:
        h = self.pre_acts(xs)
        a = self.activation(h)
        used = a != 0
        support = grad_support_of(self.activation, h)  # JumpReLU's threshold window (∂L/∂a where a = 0)
        if support is not None:
            used = used | support
        return TranscoderOutput(
            pre_acts=h,
            acts=a,
            y_hat=self.decode_std(a, xs, used=used.detach()),
            dec_norms=None
            if self.args.decoder_norm == "none"
            else self.decoder_norms(self.args.decoder_norm),
            xs=xs,
        )

    # --- public API: decoding needs the input too -------------------------------------------------
    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """acts  # [N, L, F] gates, x  # [N, L, d_in] raw -> ŷ  # [N, L, d_out] raw."""
        if x is None:
            raise ValueError("a MOLT's output depends on its input: call model.decode(acts, x) or model(x).")
        return self.unstandardize_out(self.decode_std(acts, self.standardize_in(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    # --- norms ------------------------------------------------------------------------------------
    def transform_norms(self) -> torch.Tensor:
        """‖U_j V_j‖_F  # [L, N] from r×r Gram matrices: ‖U V‖_F² = Σ (UᵀU) ⊙ (V Vᵀ)."""
        norms = []
        for U, V in zip(self.U, self.V):
            gu = torch.einsum("lnro,lnso->lnrs", U.float(), U.float())  # U_jᵀ U_j  [L, n, r, r]
            gv = torch.einsum("lnri,lnsi->lnrs", V.float(), V.float())  # V_j V_jᵀ  [L, n, r, r]
            norms.append((gu * gv).sum((-2, -1)).clamp_min(1e-24).sqrt())
        return torch.cat(norms, dim=1)

    def decoder_norms(self, mode: str = "concat") -> torch.Tensor:
        check_norm_mode(mode)  # one target per transform: both modes agree
        return self.transform_norms()

    # --- init / fold ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        a = self.args
        L, N = a.n_layers, a.features_per_layer
        norm = a.decoder_init_norm or MOLT_TRANSFORM_INIT_NORM
        for g, (r, n) in enumerate(self.groups):  # each rank draws only its shards (models/init.py)
            V = Drawn(seed, f"V.{g}", (L, n, r, a.d_in), "normal", 1.0 / math.sqrt(a.d_in))
            U = Drawn(seed, f"U.{g}", (L, n, r, a.d_out), "normal", 1.0)
            init_param_(self.V[g], V)
            init_param_(self.U[g], TransformScaled(U, V, norm))
            init_param_(self.V_bias[g], Constant((L, n, r)))
        W_g = RowNormalized(Drawn(seed, "W_enc", (L, N, a.d_in), "normal", 1.0), 2, MOLT_GATE_INIT_NORM)
        init_param_(self.W_enc, W_g)
        init_param_(self.b_enc, Constant((L, N)))
        init_param_(self.b_dec, Constant((L, a.d_out)))
        self._finish_init()

    @torch.no_grad()
    def _fold_into_weights(self, in_mean, in_scale, out_mean, out_scale) -> None:
        # z = V (x − μ)/σ + c = (V/σ) x + (c − (V/σ) μ);  y = σ'(Σ g Uᵀz + b) + μ'.
        self._fold_encoder(in_mean, in_scale)
        for U, V, c in zip(self.U, self.V, self.V_bias):
            Vf = V.float() / in_scale[:, None, None, :]
            c.copy_((c.float() - torch.einsum("lnrd,ld->lnr", Vf, in_mean)).to(c.dtype))
            V.copy_(Vf.to(V.dtype))
            U.copy_((U.float() * out_scale[:, None, None, :]).to(U.dtype))
        self.b_dec.copy_((self.b_dec.float() * out_scale + out_mean).to(self.b_dec.dtype))


def build_molt(args: TranscoderArgs) -> MixtureOfLinearTransforms:
    return MixtureOfLinearTransforms(args)
