from torchtitan_clt.models.molt.model import MixtureOfLinearTransforms, build_molt, molt_groups
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

# Parameter (regex) -> axis sharded over tp; None: replicated. The gates (the "features") are
# sharded as one contiguous block per rank, each group's transforms on their own transform axis
# (model.feature_segments(): distributed/tensor_parallel.py moves the gates between the two).
MOLT_TP_PLAN: dict[str, int | None] = {
    r"W_enc": 1,  # [L, N, d_in] gate rows
    r"b_enc": 1,  # [L, N]
    r"activation\.log_threshold": 1,  # [L, N] (JumpReLU)
    r"U\.\d+": 1,  # [L, n, r, d_out] per group
    r"V\.\d+": 1,  # [L, n, r, d_in]
    r"V_bias\.\d+": 1,  # [L, n, r]
    r"W_skip": 1,  # [L, d_in, d_out]: sharded on d_in, its shares summed with the transforms'
    r"b_dec": None,  # [L, d_out]: added once, after the partial sums are reduced
}

register_model_spec(
    ModelSpec(
        name="molt",
        build_fn=build_molt,
        tp_plan=MOLT_TP_PLAN,
        # No code layout: a transform's output is dense in d_out (U_j (V_j x)), not a row to gather.
        tp_code_plan=None,
        # Its transforms are not encoder rows and decoder rows: native export only.
        export_layout=None,
        description="Mixture of linear transforms: sparsely gated low-rank maps in groups of ranks.",
    )
)

__all__ = ["MOLT_TP_PLAN", "MixtureOfLinearTransforms", "build_molt", "molt_groups"]
