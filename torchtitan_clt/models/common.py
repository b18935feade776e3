"""Pieces shared by the families: deterministic init helpers and the per-layer encoder.

Init always draws full fp32 tensors on the CPU from one ``torch.Generator``, in a fixed order, and
copies them in; a DTensor parameter receives ``distribute_tensor(full)`` on its own mesh and
placements. So the same seed gives the same weights on any device and mesh shape.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from torchtitan_clt.protocols.registry import activation_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs, parse_dtype

try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


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


# Rows (features) are drawn in fixed chunks, each from its own generator seeded by (seed, tag,
# chunk): values never depend on how a tensor is split, so a sharded init can later draw only the
# rows a rank owns.
INIT_CHUNK_ROWS = 1024


def derived_seed(seed: int, tag: str) -> int:
    digest = hashlib.sha256(f"{seed}/{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chunked_rows(
    seed: int,
    tag: str,
    shape: tuple[int, ...],
    sample: Callable[[torch.Generator, tuple[int, ...]], torch.Tensor],
) -> torch.Tensor:
    """A [n_rows, ...] fp32 CPU tensor drawn chunk by chunk along dim 0 (see INIT_CHUNK_ROWS)."""
    parts = []
    for i, r0 in enumerate(range(0, shape[0], INIT_CHUNK_ROWS)):
        gen = torch.Generator().manual_seed(derived_seed(seed, f"{tag}/{i}"))
        parts.append(sample(gen, (min(INIT_CHUNK_ROWS, shape[0] - r0), *shape[1:])))
    return torch.cat(parts) if parts else torch.empty(shape)


def uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound


def normalize_rows(w: torch.Tensor, norm: float) -> torch.Tensor:
    """Scale each row w[i] (all dims after the first taken together) to L2 norm ``norm``."""
    n = w.flatten(1).norm(dim=1).clamp_min(1e-12)
    return w * (norm / n).view(-1, *([1] * (w.dim() - 1)))


def random_directions(gen: torch.Generator, shape: tuple[int, ...], norm: float) -> torch.Tensor:
    """Isotropic random rows (dims after the first together) of norm ``norm``."""
    return normalize_rows(torch.randn(shape, generator=gen, dtype=torch.float32), norm)


def check_norm_mode(mode: str) -> None:
    if mode not in ("concat", "sum"):
        raise ValueError(f"decoder norm mode must be 'concat' or 'sum' (got {mode!r}).")


def new_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Values are set by init_weights; the module may be on the meta device here.
    return nn.Parameter(torch.empty(*shape, dtype=dtype))


class LayerwiseTranscoder(Transcoder):
    """A transcoder whose layer l encodes only x_l: h_l = W_enc,l x_l + b_enc,l.

    Parameters: ``W_enc  # [L, F, d_in]``, ``b_enc  # [L, F]``, ``b_dec  # [L, d_out]`` and
    the module ``activation``. Families add their decoder weights.
    """

    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        L, F = args.n_layers, args.features_per_layer
        dtype = parse_dtype(args.dtype)
        self.W_enc = new_param(L, F, args.d_in, dtype=dtype)
        self.b_enc = new_param(L, F, dtype=dtype)
        self.b_dec = new_param(L, args.d_out, dtype=dtype)
        self.activation = activation_registry.get(args.activation)(args)

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

    def _init_encoder(self, seed: int, tied_from: Callable[[int], torch.Tensor]) -> None:
        """Encoder init: layer i's W_enc = ``tied_from(i)``  # [F, d] when ``tied_init`` (and
        d_in == d_out), else U(±1/sqrt(F)) as in Anthropic's CLT (Ameisen et al. 2025); b_enc = 0."""
        L, F, d_in = self.args.n_layers, self.args.features_per_layer, self.args.d_in
        tied = self.args.tied_init and self.args.d_in == self.args.d_out
        bound = 1.0 / math.sqrt(F)
        W_enc = torch.stack(
            [
                tied_from(i)
                if tied
                else chunked_rows(seed, f"W_enc.{i}", (F, d_in), lambda g, s: uniform(g, s, bound))
                for i in range(L)
            ]
        )
        copy_full_(self.W_enc, W_enc)
        copy_full_(self.b_enc, torch.zeros(L, F))

    def _finish_init(self) -> None:
        """Non-weight state: identity standardization and the activation's own init."""
        self.reset_standardization()
        init = getattr(self.activation, "init_weights", None)
        if init is not None:
            init()
