from torchtitan_clt.models.molt.model import MixtureOfLinearTransforms, build_molt, molt_groups
from torchtitan_clt.models.molt.parallelize import parallelize_molt
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="molt",
        build_fn=build_molt,
        parallelize_fn=parallelize_molt,
        description="Mixture of linear transforms: sparsely gated low-rank maps in groups of ranks.",
    )
)

__all__ = ["MixtureOfLinearTransforms", "build_molt", "molt_groups"]
