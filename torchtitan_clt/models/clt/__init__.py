from torchtitan_clt.models.clt.model import CrossLayerTranscoder, build_clt
from torchtitan_clt.models.clt.parallelize import parallelize_clt
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="clt",
        build_fn=build_clt,
        parallelize_fn=parallelize_clt,
        description="Crosslayer transcoder: a layer-s feature writes to every layer t >= s.",
    )
)

__all__ = ["CrossLayerTranscoder", "build_clt"]
