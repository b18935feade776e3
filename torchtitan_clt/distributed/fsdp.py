"""FSDP2 (``fully_shard``) over the data-parallel mesh, composable with tensor parallelism."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from torchtitan_clt.distributed.ring_comm import use_ring_collectives
from torchtitan_clt.distributed.shm_comm import use_shared_memory_collectives
from torchtitan_clt.tools.dtypes import DTYPES

# Methods other than ``forward`` that read parameters: FSDP must gather them around each call.
# They call each other (``forward_std`` takes ``decoder_norms``, ``forward`` calls ``encode`` /
# ``decode``), so only the outermost call is an FSDP entry point (``register_entry_points``).
FSDP_FORWARD_METHODS = ("forward_std", "encode", "decode", "decoder_norms")


def mixed_precision_policy(job_config, device_type: str) -> MixedPrecisionPolicy | None:
    """bf16 compute params / fp32 reduction on GPU per config; no policy on CPU (fp32 throughout)."""
    if device_type != "cuda":
        return None
    p = job_config.parallelism
    if job_config.training.mixed_precision == "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[p.mixed_precision_param], reduce_dtype=DTYPES[p.mixed_precision_reduce]
    )


def reshard_after_forward(policy: str, dp_mesh: DeviceMesh) -> bool:
    """``always`` frees the gathered params after forward (re-gathered in backward), ``never``
    keeps them; ``default`` keeps them (the dictionary is one unit: its backward follows at once)."""
    return policy == "always"


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None,
    reshard_policy: str = "default",
    extra_units: list[nn.Module] | None = None,
    ring_collectives: bool = True,
    shared_memory: bool = True,
) -> nn.Module:
    """``fully_shard`` ``model`` (and first each module in ``extra_units``) over ``dp_mesh``.

    ``dp_mesh`` is 1-D (FSDP) or 2-D ``(dp_replicate, dp_shard)`` (HSDP: sharded inside a replica
    group, all-reduced across them). On gloo ``ring_collectives`` swaps FSDP2's all-gather and
    reduce-scatter for point-to-point rings (``distributed/ring_comm.py``), and ``shared_memory``
    for a ``/dev/shm`` segment where the shard group shares a host (``distributed/shm_comm.py``).
    """
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward(reshard_policy, dp_mesh)}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    shard_group = dp_mesh.get_group(dp_mesh.ndim - 1)
    for unit in [*(extra_units or []), model]:
        fully_shard(unit, **kwargs)
        if shared_memory and use_shared_memory_collectives(unit, shard_group, rings=ring_collectives):
            continue
        if ring_collectives:
            use_ring_collectives(unit)
    register_entry_points(model, FSDP_FORWARD_METHODS)
    return model


def register_entry_points(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``forward`` and each method in ``names`` an FSDP forward, outermost call only.

    ``register_fsdp_forward_method`` runs FSDP's pre/post-forward around every call, nested ones
    included: with ``reshard_after_forward`` on, ``decoder_norms`` called inside ``forward_std``
    freed the gathered parameters mid-forward and the rest of ``forward_std`` met sharded DTensors
    ("aten.bmm got mixed torch.Tensor and DTensor"). A call made while another entry point of
    ``model`` runs goes straight to the method: the parameters are already gathered, and the
    outer call's post-forward reshards them once.
    """
    depth = [0]  # entry points of ``model`` now running (a list: the closures below mutate it)

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, out):
        depth[0] -= 1

    # Around FSDP's own forward hooks (registered by fully_shard): always_call keeps the count
    # right when forward raises.
    model.register_forward_pre_hook(enter, prepend=True)
    model.register_forward_hook(leave, always_call=True)
    for name in names:
        if not hasattr(model, name):
            continue
        plain = getattr(model, name)
        register_fsdp_forward_method(model, name)
        setattr(model, name, _outermost(plain, getattr(model, name), depth))


def _outermost(plain, gathered, depth: list[int]):
    """``gathered`` (FSDP's wrapped method) for an outermost call, ``plain`` for a nested one."""

    @functools.wraps(plain)
    def method(*args, **kwargs):
        if depth[0]:
            return plain(*args, **kwargs)
        depth[0] += 1
        try:
            return gathered(*args, **kwargs)
        finally:
            depth[0] -= 1

    return method
