from torchtitan_clt.models.plt import PLT_TP_CODE_PLAN, PLT_TP_PLAN
from torchtitan_clt.models.sae.model import SparseAutoencoder, build_sae
from torchtitan_clt.protocols.model_spec import ExportLayout, ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="sae",
        build_fn=build_sae,
        tp_plan=PLT_TP_PLAN,  # an SAE computes what a per-layer transcoder does
        tp_code_plan=PLT_TP_CODE_PLAN,
        export_layout=ExportLayout("per_layer"),
        description="Sparse autoencoder: reads and writes one hook point (data.hook_in = data.hook_out).",
    )
)

__all__ = ["SparseAutoencoder", "build_sae"]
