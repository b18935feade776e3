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
        # No tensor parallelism yet: the nested losses decode prefixes [0, m) of the global feature
        # axis, so with features sharded each rank would need its share of every prefix and a
        # reduction per prefix. Until that exists, parallelism.tp > 1 stops with a message.
        tp_plan=None,
        export_layout=ExportLayout("crosslayer"),  # at inference it is a plain CLT
        activations=MATRYOSHKA_ACTIVATIONS,
        description="Crosslayer transcoder trained so that nested feature prefixes each reconstruct.",
    )
)

__all__ = ["MatryoshkaCLT", "build_matryoshka_clt", "matryoshka_prefixes"]
