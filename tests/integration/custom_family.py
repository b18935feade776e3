"""A user's own family, activation and data source, registered from ``job.custom_import``.

Used by test_train_cli.py; nothing in the package knows these names.
"""

from dataclasses import dataclass

import torch
from torch import nn

from torchtitan_clt.data.source import ActivationSource, SourceContext
from torchtitan_clt.protocols import ModelSpec, activation_registry, data_source_registry, register_model_spec
from torchtitan_clt.protocols.model_spec import ExportLayout
from torchtitan_clt.protocols.transcoder import Transcoder


class SquaredReLU(nn.Module):
    def __init__(self, args):
        super().__init__()

    def forward(self, h):
        return torch.relu(h) ** 2


@dataclass
class TiedOptions:
    """The family's own [model] fields (``--model.init_scale=...``)."""

    init_scale: float = 0.1


class TiedSAE(Transcoder):
    """One weight matrix per layer: encode with W, decode with W transposed."""

    def __init__(self, args):
        super().__init__(args)
        L, F, d = args.n_layers, args.features_per_layer, args.d_in
        self.W = nn.Parameter(torch.empty(L, F, d))
        self.b_enc = nn.Parameter(torch.empty(L, F))
        self.b_dec = nn.Parameter(torch.empty(L, d))
        self.activation = activation_registry.get(args.activation)(args)

    def pre_acts(self, xs):
        return torch.einsum("bld,lfd->blf", xs, self.W) + self.b_enc

    def decode_std(self, acts):
        return torch.einsum("blf,lfd->bld", acts, self.W) + self.b_dec

    def decoder_norms(self, mode="concat"):
        return self.W.norm(dim=-1)

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.W.copy_(torch.randn(self.W.shape, generator=g) * self.args.extra["init_scale"])
        self.b_enc.zero_()
        self.b_dec.zero_()

    def _fold_into_weights(self, in_mean, in_scale, out_mean, out_scale):
        identity = (
            (in_mean == 0).all() & (in_scale == 1).all() & (out_mean == 0).all() & (out_scale == 1).all()
        )
        if not bool(identity):
            raise ValueError("tied weights cannot absorb standardization: train with standardize.* = none")


def tied_layer_tensors(model, j):
    """What the per-layer export formats read: the one matrix serves as encoder and decoder."""
    return {
        "W_enc": model.W[j],
        "b_enc": model.b_enc[j],
        "W_dec": model.W[j],
        "b_dec": model.b_dec[j],
        "W_skip": None,
    }


class ToySource(ActivationSource):  # no LLM: llm is None
    """y = 2·x on Gaussian x: a fixed map any dictionary can learn."""

    def __init__(self, cfg, ctx: SourceContext):
        self.n_layers, self.d_in, self.d_out = 2, 16, 16
        self.layers, self.model_name, self.hook_in, self.hook_out = [0, 1], "toy", "resid_mid", "mlp_out"
        self.device = ctx.device
        self.g = torch.Generator().manual_seed(ctx.seed)
        self.calls = 0

    def next_batch(self, batch_size):
        self.calls += 1
        x = torch.randn(batch_size, 2, 16, generator=self.g)
        return x.to(self.device), (2 * x).to(self.device)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, sd):
        self.calls = sd["calls"]

    def close(self):
        pass


class NaNSource(ToySource):
    """Turns to NaN from the 4th batch on, to exercise the non-finite loss guard."""

    def next_batch(self, batch_size):
        x, y = super().next_batch(batch_size)
        if self.calls >= 4:
            y = torch.full_like(y, float("nan"))
        return x, y


class NaNOnRank1Source(ToySource):
    """NaN targets from the 4th batch on, on rank 1 only: the other ranks must skip with it."""

    def next_batch(self, batch_size):
        import torch.distributed as dist

        x, y = super().next_batch(batch_size)
        if self.calls >= 4 and dist.is_initialized() and dist.get_rank() == 1:
            y = torch.full_like(y, float("nan"))
        return x, y


if "tied_sae" not in __import__("torchtitan_clt.protocols", fromlist=["model_registry"]).model_registry:
    register_model_spec(
        ModelSpec(
            name="tied_sae",
            build_fn=TiedSAE,
            export_layout=ExportLayout("per_layer", tied_layer_tensors),
            options=TiedOptions,
            description="test family",
        )
    )
    activation_registry.register("squared_relu", SquaredReLU)
    data_source_registry.register("toy", ToySource)
    data_source_registry.register("toy_nan", NaNSource)
    data_source_registry.register("toy_nan_rank1", NaNOnRank1Source)
