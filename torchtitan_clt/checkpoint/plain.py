"""The plain model behind a trained one, for the exports: unwrapped from ``torch.compile``,
gathered from its shards, standardization folded, fp32 on the CPU."""

from __future__ import annotations

import torch

from torchtitan_clt.models.common import full_tensor
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs


def unwrap(model: torch.nn.Module) -> Transcoder:
    # torch.compile wraps the module; its state_dict keys gain an "_orig_mod." prefix.
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, Transcoder):
        raise TypeError(f"expected a Transcoder, got {type(model).__name__}.")
    return model


def is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def folded_cpu_copy(model: torch.nn.Module) -> Transcoder:
    """An fp32 CPU copy of ``model`` with standardization folded, in eval mode; ``model`` is left
    untouched. Sharded (DTensor) state is gathered, so call it on every rank."""
    model = unwrap(model)
    state = {}
    for name, value in model.state_dict().items():
        value = full_tensor(value).detach().to("cpu")
        state[name] = value.float() if value.is_floating_point() else value
    args = TranscoderArgs.from_dict(model.args.to_dict())
    args.dtype = "float32"
    copy = model_registry.get(args.family).build_fn(args)
    copy.load_state_dict(state)
    copy.fold_standardization()
    return copy.eval()
