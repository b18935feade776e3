from torchtitan_clt.models.plt.model import PerLayerTranscoder, build_plt
from torchtitan_clt.models.plt.parallelize import parallelize_plt
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="plt",
        build_fn=build_plt,
        parallelize_fn=parallelize_plt,
        description="Per-layer transcoder: layer l's features read x_l and write only y_l.",
    )
)

__all__ = ["PerLayerTranscoder", "build_plt"]
