"""``parallelize_matryoshka_clt``: FSDP2 over dp; no tensor parallelism yet.

The nested losses decode feature prefixes ``[0, m)`` of the global feature axis; with features
sharded over tp each rank would need its shard's share of every prefix and a reduction per prefix.
Until that exists, ``parallelism.tp > 1`` stops with a message (``tp_plan=None``).
"""

from __future__ import annotations

from torch import nn

from torchtitan_clt.distributed.parallelize import parallelize_transcoder


def parallelize_matryoshka_clt(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    return parallelize_transcoder(model, parallel_dims, job_config, None)
