"""Parallelism: ``ParallelDims`` and the device mesh, process-group setup, FSDP2 / TP helpers."""

from torchtitan_clt.distributed.parallel_dims import ParallelDims
from torchtitan_clt.distributed.utils import (
    check_config_consistent,
    destroy,
    dist_max,
    dist_mean,
    dist_min,
    dist_sum,
    init_distributed,
)

__all__ = [
    "ParallelDims",
    "check_config_consistent",
    "destroy",
    "dist_max",
    "dist_mean",
    "dist_min",
    "dist_sum",
    "init_distributed",
]
