"""``parallelize_clt``: features sharded over tp, then FSDP2 over dp (see distributed/)."""

from __future__ import annotations

from torch import nn

from torchtitan_clt.distributed.parallelize import parallelize_transcoder

# Parameter (regex) -> feature axis sharded over tp; None: replicated.
CLT_TP_PLAN: dict[str, int | None] = {
    r"W_enc": 1,  # [L, F, d_in]
    r"b_enc": 1,  # [L, F]
    r"W_dec\.\d+": 0,  # [F, L-s, d_out] per source layer s
    r"activation\.log_threshold": 1,  # [L, F] (JumpReLU)
    r"W_skip": None,  # [L, d_in, d_out]: replicated, added after the partial sums (skip_connection)
    r"b_dec": None,  # [L, d_out]: added once, after the decoder's partial sums are reduced
}


def parallelize_clt(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    return parallelize_transcoder(model, parallel_dims, job_config, CLT_TP_PLAN)
