from torchtitan_clt.models.plt.model import PerLayerTranscoder, build_plt
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

# parallelize_fn: models/plt/parallelize.py (the distributed part) plugs in here once it exists.
register_model_spec(
    ModelSpec(
        name="plt",
        build_fn=build_plt,
        parallelize_fn=None,
        description="Per-layer transcoder: layer l's features read x_l and write only y_l.",
    )
)

__all__ = ["PerLayerTranscoder", "build_plt"]
