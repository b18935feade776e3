"""FSDP2 (``fully_shard``) over the data-parallel mesh, composable with tensor parallelism."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from torchtitan_clt.distributed.ring_comm import use_ring_collectives
from torchtitan_clt.distributed.shm_comm import use_shared_memory_collectives
from torchtitan_clt.tools.dtypes import DTYPES

# Methods other than ``forward`` that read parameters: FSDP must gather them around each call.
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
    for name in FSDP_FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model
