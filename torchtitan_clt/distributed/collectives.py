"""Collectives the sharded forward needs: an all-reduce with the right backward, a detached
all-reduce for metrics; the exact distributed k-th largest value lives with the selection kernels
(``kernels/collectives.py``) and is re-exported here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torchtitan_clt.kernels.collectives import all_min, global_kth_largest, sum_partials, world_size

__all__ = ["all_min", "all_reduce_detached", "global_kth_largest", "sum_partials", "world_size"]


def all_reduce_detached(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of ``x`` without autograd (metrics, counters)."""
    if group is None or world_size(group) == 1:
        return x.detach()
    y = x.detach().contiguous().clone()
    dist.all_reduce(y, op=op, group=group)
    return y
