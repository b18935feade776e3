"""Sharding applied to a family's model from outside: TP, the model's process groups, then FSDP2.

A family declares only its tensor-parallel plan on its ``ModelSpec`` (which axis of each
parameter is the feature axis); the model code never imports this package. The order is
TorchTitan's: tensor parallelism first (parameters become tp DTensors), then FSDP2 wraps those
over the data-parallel mesh.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.distributed.fsdp import apply_fsdp, mixed_precision_policy
from torchtitan_clt.distributed.parallel_dims import ParallelDims
from torchtitan_clt.distributed.tensor_parallel import apply_tp
from torchtitan_clt.distributed.tp_code import apply_tp_code
from torchtitan_clt.distributed.utils import device_type_for
from torchtitan_clt.protocols.transcoder import MeshGroups
from torchtitan_clt.tools.logging import logger


def parallelize_model(model: nn.Module, spec, parallel_dims: ParallelDims, job_config) -> nn.Module:
    """``spec.parallelize_fn`` when the family brings its own, else ``spec.tp_plan`` + FSDP2."""
    if spec.parallelize_fn is not None:
        return spec.parallelize_fn(model, parallel_dims, job_config)
    code = getattr(job_config.parallelism, "tp_layout", "features") == "code"
    if code and parallel_dims.tp_enabled and spec.tp_code_plan is None:
        raise ConfigError(
            f'parallelism.tp_layout = "code": model.name = {job_config.model.name!r} declares no '
            'tp_code_plan (ModelSpec); set parallelism.tp_layout = "features".'
        )
    plan = spec.tp_code_plan if code else spec.tp_plan
    return parallelize_transcoder(
        model, parallel_dims, job_config, plan, layout="code" if code else "features", methods=spec.tp_methods
    )


def parallelize_transcoder(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config,
    tp_plan: dict[str, int | None] | None,
    layout: str = "features",
    methods: dict | None = None,
) -> nn.Module:
    """Apply the mesh to a (meta-device) transcoder; a no-op in a single process.

    ``tp_plan`` ``None``: the family has no tensor-parallel layout (data parallelism only).
    ``layout``: ``features`` (``apply_tp``) or ``code`` (``apply_tp_code``; ``tp_plan`` is then
    the family's ``tp_code_plan``). ``methods``: the family's ``ModelSpec.tp_methods``.
    """
    if not parallel_dims.distributed:
        return model
    tp_group = None
    if parallel_dims.tp_enabled:
        if tp_plan is None:
            raise ConfigError(
                f"model.name = {job_config.model.name!r} does not support tensor parallelism yet: set "
                "parallelism.tp = 1 and scale with parallelism.dp_shard / dp_replicate."
            )
        if layout == "code":
            apply_tp_code(model, parallel_dims.get_mesh("tp"), tp_plan, methods=methods)
        else:
            apply_tp(model, parallel_dims.get_mesh("tp"), tp_plan, methods=methods)
        tp_group = parallel_dims.get_group("tp")
    # BatchTopK selects over the global batch and all features: every rank holds a different part
    # of [B, L, F], so the whole world takes part. TopK and the decoder's partial sums need only tp.
    if hasattr(model, "set_mesh_groups"):
        model.set_mesh_groups(
            MeshGroups(
                batch=dist.group.WORLD,
                features=tp_group,
                batch_scale=parallel_dims.dp_degree,
                feature_shards=parallel_dims.tp,
                sum_decoder_partials=not (parallel_dims.tp_enabled and layout == "code"),
            )
        )
    if parallel_dims.fsdp_enabled:
        p = job_config.parallelism
        mp = mixed_precision_policy(job_config, device_type_for(job_config))
        apply_fsdp(
            model,
            parallel_dims.get_mesh("fsdp"),
            mp,
            p.fsdp_reshard_after_forward,
            ring_collectives=p.gloo_ring_collectives,
            shared_memory=p.gloo_shared_memory,
        )
    logger.info(
        f"parallelized {type(model).__name__}: tp={parallel_dims.tp}"
        f"{f' (layout {layout})' if parallel_dims.tp_enabled else ''}, "
        f"fsdp={'HSDP' if parallel_dims.hsdp_enabled else 'FSDP' if parallel_dims.fsdp_enabled else 'off'}"
        f" over dp={parallel_dims.dp_degree}"
    )
    return model
