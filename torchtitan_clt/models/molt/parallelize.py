"""``parallelize_molt``: FSDP2 over dp; no tensor parallelism yet.

A MOLT's natural tp layout shards the transforms (each group's ``U``, ``V``, gates) over ranks with
the outputs' partial sums reduced; it is not written yet, so ``parallelism.tp > 1`` stops with a
message (``tp_plan=None``) and the model scales over data-parallel ranks.
"""

from __future__ import annotations

from torch import nn

from torchtitan_clt.distributed.parallelize import parallelize_transcoder


def parallelize_molt(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    return parallelize_transcoder(model, parallel_dims, job_config, None)
