from torchtitan_clt.models.matryoshka.model import (
    MATRYOSHKA_ACTIVATIONS,
    MatryoshkaCLT,
    build_matryoshka_clt,
    matryoshka_prefixes,
)
from torchtitan_clt.models.matryoshka.parallelize import parallelize_matryoshka_clt
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="matryoshka_clt",
        build_fn=build_matryoshka_clt,
        parallelize_fn=parallelize_matryoshka_clt,
        activations=MATRYOSHKA_ACTIVATIONS,
        description="Crosslayer transcoder trained so that nested feature prefixes each reconstruct.",
    )
)

__all__ = ["MatryoshkaCLT", "build_matryoshka_clt", "matryoshka_prefixes"]
