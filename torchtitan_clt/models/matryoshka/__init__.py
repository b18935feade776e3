from torchtitan_clt.models.clt import CLT_TP_PLAN
from torchtitan_clt.models.matryoshka.model import (
    MATRYOSHKA_ACTIVATIONS,
    MatryoshkaCLT,
    build_matryoshka_clt,
    matryoshka_prefixes,
)
from torchtitan_clt.protocols.model_spec import ExportLayout, ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="matryoshka_clt",
        build_fn=build_matryoshka_clt,
        # The CLT's parameters, sharded as the CLT's: each rank decodes its band of every nested
        # prefix and the prefixes' partial sums are reduced together (decode_prefixes_std).
        tp_plan=CLT_TP_PLAN,
        # No code layout: the nested prefixes decode densely, not from a gathered sparse code.
        tp_code_plan=None,
        export_layout=ExportLayout("crosslayer"),  # at inference it is a plain CLT
        activations=MATRYOSHKA_ACTIVATIONS,
        description="Crosslayer transcoder trained so that nested feature prefixes each reconstruct.",
    )
)

__all__ = ["MatryoshkaCLT", "build_matryoshka_clt", "matryoshka_prefixes"]
