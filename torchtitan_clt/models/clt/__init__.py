from torchtitan_clt.models.clt.model import CrossLayerTranscoder, build_clt
from torchtitan_clt.protocols.model_spec import ExportLayout, ModelSpec, register_model_spec

# Parameter (regex) -> feature axis sharded over tp; None: replicated.
CLT_TP_PLAN: dict[str, int | None] = {
    r"W_enc": 1,  # [L, F, d_in]
    r"b_enc": 1,  # [L, F]
    r"W_dec\.\d+": 0,  # [F, L-s, d_out] per source layer s
    r"activation\.log_threshold": 1,  # [L, F] (JumpReLU)
    r"W_skip": 1,  # [L, d_in, d_out]: sharded on d_in; a rank's slice of x adds its part to ŷ's sum
    r"b_dec": None,  # [L, d_out]: added once, after the decoder's partial sums are reduced
}

# parallelism.tp_layout = "code": the encoder on its feature axis, the decoder, the skip path and
# b_dec on d_out (each rank writes its own columns of ŷ from every active feature).
CLT_TP_CODE_PLAN: dict[str, int | None] = {
    r"W_enc": 1,  # [L, F, d_in]
    r"b_enc": 1,  # [L, F]
    r"activation\.log_threshold": 1,  # [L, F] (JumpReLU)
    r"W_dec\.\d+": 2,  # [F, L-s, d_out]
    r"W_skip": 2,  # [L, d_in, d_out]
    r"b_dec": 1,  # [L, d_out]
}

register_model_spec(
    ModelSpec(
        name="clt",
        build_fn=build_clt,
        tp_plan=CLT_TP_PLAN,
        tp_code_plan=CLT_TP_CODE_PLAN,
        export_layout=ExportLayout("crosslayer"),
        description="Crosslayer transcoder: a layer-s feature writes to every layer t >= s.",
    )
)

__all__ = ["CLT_TP_CODE_PLAN", "CLT_TP_PLAN", "CrossLayerTranscoder", "build_clt"]
