"""``parallelize_sae``: an SAE computes what a per-layer transcoder does, so it takes PLT's plan."""

from __future__ import annotations

from torch import nn

from torchtitan_clt.distributed.parallelize import parallelize_transcoder
from torchtitan_clt.models.plt.parallelize import PLT_TP_PLAN


def parallelize_sae(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    return parallelize_transcoder(model, parallel_dims, job_config, PLT_TP_PLAN)
