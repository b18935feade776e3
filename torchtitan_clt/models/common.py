"""Pieces shared by the families: DTensor helpers and the per-layer encoder.

Init is per shard (``models/init.py``): each parameter's values are a virtual full tensor drawn in
fixed chunks from the seed, and every rank writes only its own shard, so the same seed gives the
same weights on any device and mesh shape without any rank holding a full parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchtitan_clt import kernels
from torchtitan_clt.kernels.selection import Selection
from torchtitan_clt.kernels.sparse_step import sparse_forward
from torchtitan_clt.models.init import Constant, Drawn, Virtual, init_param_
from torchtitan_clt.protocols.registry import activation_registry
from torchtitan_clt.protocols.transcoder import (
    SparseCode,
    Transcoder,
    TranscoderArgs,
    TranscoderOutput,
    parse_dtype,
)

try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def selection_of(act: nn.Module) -> Selection | None:
    """``act.selection()``, or None for a user's activation that subclasses ``nn.Module`` only
    (the registry asks for ``cls(args) -> nn.Module``, not for ``Activation``)."""
    fn = getattr(act, "selection", None)
    return fn() if fn is not None else None


def grad_support_of(act: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """``act.grad_support(h)``, or None for a plain ``nn.Module`` activation."""
    fn = getattr(act, "grad_support", None)
    return fn(h) if fn is not None else None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local_index(dst: torch.Tensor) -> tuple[slice, ...] | None:
    """This rank's slice of the full tensor behind DTensor ``dst``, for plain ``Shard`` /
    ``Replicate`` placements (DTensor's chunking: ceil-sized chunks, the last ones short or empty);
    None for anything else (e.g. FSDP2's strided shards), which takes the generic path."""
    coord = dst.device_mesh.get_coordinate()
    if coord is None:
        return None
    starts, sizes = [0] * dst.dim(), list(dst.shape)
    for mesh_dim, p in enumerate(dst.placements):
        if type(p) is Replicate:
            continue
        if type(p) is not Shard:
            return None
        d = p.dim % dst.dim()
        n, r = dst.device_mesh.size(mesh_dim), coord[mesh_dim]
        chunk = -(-sizes[d] // n)
        lo = min(r * chunk, sizes[d])
        starts[d] += lo
        sizes[d] = min(lo + chunk, sizes[d]) - lo
    index = tuple(slice(a, a + n) for a, n in zip(starts, sizes))
    return index if tuple(sizes) == tuple(dst.to_local().shape) else None


@torch.no_grad()
def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) CPU tensor into ``dst``, a plain tensor or a DTensor.

    For a DTensor only this rank's slice goes to the device when the placements allow it, so a
    parameter never needs its whole size in device memory."""
    if is_dtensor(dst):
        local = dst.to_local()
        index = _local_index(dst)
        if index is not None:
            local.copy_(full[index].to(device=local.device, dtype=local.dtype))
        else:
            full = full.to(device=local.device, dtype=dst.dtype)
            dst.copy_(distribute_tensor(full, dst.device_mesh, dst.placements))
    else:
        dst.copy_(full.to(device=dst.device, dtype=dst.dtype))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t`` (a collective for a sharded DTensor: call it on every rank)."""
    return t.full_tensor() if is_dtensor(t) else t


def check_norm_mode(mode: str) -> None:
    if mode not in ("concat", "sum"):
        raise ValueError(f"decoder norm mode must be 'concat' or 'sum' (got {mode!r}).")


def new_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Values are set by init_weights; the module may be on the meta device here.
    return nn.Parameter(torch.empty(*shape, dtype=dtype))


class LayerwiseTranscoder(Transcoder):
    """A transcoder whose layer l encodes only x_l: h_l = W_enc,l x_l + b_enc,l.

    Parameters: ``W_enc  # [L, F, d_in]``, ``b_enc  # [L, F]``, ``b_dec  # [L, d_out]`` and
    the module ``activation``. Families add their decoder weights, ``decode_std(acts, support)``
    and ``decode_selected(idx, vals, bias)`` (the sparse decoder of the sparse step).

    ``forward_std`` is sparse on every mesh: TopK / BatchTopK (in training) run the sparse step
    (``kernels.sparse_step.sparse_forward``: encoder, selection over ``mesh_groups``, sparse
    decode into a partial ŷ summed over the feature shards, sparse encoder backward); an
    elementwise activation (JumpReLU, ReLU) decodes sparsely whenever its active fraction is under
    ``kernels.sparse_density_threshold``, carrying the entries its gradient needs
    (``activation.grad_support``).
    """

    sparse_forward = True
    """False keeps TopK / BatchTopK on the dense activations (benchmarks compare the two)."""

    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        L, F = args.n_layers, args.features_per_layer
        dtype = parse_dtype(args.dtype)
        self.W_enc = new_param(L, F, args.d_in, dtype=dtype)
        self.b_enc = new_param(L, F, dtype=dtype)
        self.b_dec = new_param(L, args.d_out, dtype=dtype)
        if args.skip_connection:
            self.W_skip = new_param(L, args.d_in, args.d_out, dtype=dtype)
        else:
            self.register_parameter("W_skip", None)
        self.activation = activation_registry.get(args.activation)(args)

    def local_features(self) -> int:
        """Features per layer on this rank (all of them unless tensor parallel)."""
        return self.args.features_per_layer // self.mesh_groups.feature_shards

    def sparse_selection(self) -> Selection | None:
        """The selection the sparse step runs now, or None (elementwise activation, eval-mode
        BatchTopK, ``sparse_forward`` off, or k above the density threshold)."""
        sel = selection_of(self.activation) if self.sparse_forward else None
        # k / F is the active fraction on every rank too: features shard k along with F.
        if sel is None or sel.k > kernels.options().sparse_density_threshold * self.args.features_per_layer:
            return None
        return sel

    def decoder_path(self) -> str:
        """In words, what the training forward runs (logged once at start)."""
        act, g = self.activation, self.mesh_groups
        was = act.training
        act.train(True)
        try:
            sel = selection_of(act)
            plan = self.sparse_selection()
        finally:
            act.train(was)
        backend = (
            kernels.resolve_backend(self.b_dec, None) if not self.b_dec.is_meta else kernels.options().backend
        )
        where = f" over {g.feature_shards} feature shards" if g.feature_shards > 1 else ""
        where += f", selection over a {g.batch_scale}x batch" if g.batch_scale > 1 else ""
        if plan is not None:
            return f"sparse ({backend}): {plan.kind} k={plan.k} select -> sparse decode{where}"
        if sel is None:
            thr = kernels.options().sparse_density_threshold
            return (
                f"sparse ({backend}) while the active fraction of {self.args.activation} is below "
                f"{thr:g}, dense above it{where}"
            )
        if not self.sparse_forward:
            return "dense: model.sparse_forward is off"
        return (
            f"dense: k={sel.k} is over kernels.sparse_density_threshold x {self.args.features_per_layer} "
            f"features (raise --kernels.sparse_density_threshold or model.features_per_layer)"
        )

    def forward_std(self, xs: torch.Tensor) -> TranscoderOutput:
        sel = self.sparse_selection()
        dec_norms = None if self.args.decoder_norm == "none" else self.decoder_norms(self.args.decoder_norm)
        if sel is None:
            h = self.pre_acts(xs)
            a = self.activation(h)
            support = grad_support_of(self.activation, h) if self.training else None
            y = self.decode_std(a) if support is None else self.decode_std(a, support=support)
            return TranscoderOutput(pre_acts=h, acts=a, y_hat=self._add_skip(y, xs), dec_norms=dec_norms)
        g, act = self.mesh_groups, self.activation
        out = sparse_forward(
            xs,
            self.W_enc,
            self.b_enc,
            self.decode_selected,
            self.b_dec,
            sel,
            group=g.features if sel.kind == "topk" else g.batch,
            batch_scale=g.batch_scale,
            tp_group=g.features if g.sum_decoder_partials else None,
            extra=self.skip_partial(xs),  # under tp: in the same sum as the features' partials
        )
        if self.training:
            act._observe(act.observed_min(out.pre_acts, out.idx))
        return TranscoderOutput(
            pre_acts=out.pre_acts,
            acts=None,  # the code is the activations; a dense tensor only if something reads .acts
            y_hat=out.y_hat,
            dec_norms=dec_norms,
            code=SparseCode(out.idx, out.vals, self.local_features()),
        )

    def skip_std(self, xs: torch.Tensor) -> torch.Tensor | None:
        if self.W_skip is None:
            return None
        W = self.W_skip  # [L, d_in, d_out]
        return torch.bmm(xs.to(W.dtype).transpose(0, 1), W).transpose(0, 1)  # [B, L, d_out]

    @torch.no_grad()
    def fold_standardization(self) -> None:
        # Skip path in standardized units: S (x − μ)/σ → raw x: (S/σ) x − (μ/σ)·S, the constant
        # going to b_dec before the family scales b_dec and the outputs by σ' (and adds μ').
        if self.W_skip is not None:
            S = self.W_skip.float() / self.in_scale[:, :, None]
            b = self.b_dec.float() - torch.einsum("ld,lde->le", self.in_mean, S)
            self.b_dec.copy_(b.to(self.b_dec.dtype))
            self.W_skip.copy_((S * self.out_scale[:, None, :]).to(self.W_skip.dtype))
        super().fold_standardization()

    def decode_selected(self, idx: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The sparse decoder: ``idx, vals [N, L, K]`` (this rank's features) -> ``[N, L, d_out]``."""
        raise NotImplementedError

    def pre_acts(self, xs: torch.Tensor) -> torch.Tensor:
        # One batched matmul over layers: [L, B, d] @ [L, d, F] -> [L, B, F].
        xs = xs.to(self.W_enc.dtype)  # fp32 batch into bf16 params without autocast
        h = torch.bmm(xs.transpose(0, 1), self.W_enc.transpose(1, 2)).transpose(0, 1)
        return h + self.b_enc

    def _fold_encoder(self, in_mean: torch.Tensor, in_scale: torch.Tensor) -> None:
        W = self.W_enc.float() / in_scale[:, None, :]  # [L, F, d_in]
        b = self.b_enc.float() - torch.einsum("lfd,ld->lf", W, in_mean)
        self.W_enc.copy_(W.to(self.W_enc.dtype))
        self.b_enc.copy_(b.to(self.b_enc.dtype))

    def _init_encoder(self, seed: int, tied: Virtual) -> None:
        """Encoder init: W_enc = ``tied``  # [L, F, d] (virtual, e.g. the decoder's own block) when
        ``tied_init`` (and d_in == d_out), else U(±1/sqrt(F)) as in Anthropic's CLT (Ameisen et al.
        2025); b_enc = 0. Each rank draws only its shard (``models/init.py``)."""
        L, F, d_in = self.args.n_layers, self.args.features_per_layer, self.args.d_in
        if not (self.args.tied_init and self.args.d_in == self.args.d_out):
            tied = Drawn(seed, "W_enc", (L, F, d_in), "uniform", 1.0 / math.sqrt(F))
        init_param_(self.W_enc, tied)
        init_param_(self.b_enc, Constant((L, F)))

    def _finish_init(self) -> None:
        """The skip path at zero (skip transcoders start as the plain dictionary), identity
        standardization and the activation's own init."""
        if self.W_skip is not None:
            init_param_(self.W_skip, Constant(tuple(self.W_skip.shape)))
        self.reset_standardization()
        init = getattr(self.activation, "init_weights", None)
        if init is not None:
            init()
