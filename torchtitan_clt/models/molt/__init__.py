from torchtitan_clt.models.molt.model import MixtureOfLinearTransforms, build_molt, molt_groups
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="molt",
        build_fn=build_molt,
        # No tensor parallelism yet: its natural layout shards the transforms (each group's U, V and
        # gates) over ranks and reduces the outputs' partial sums; until written, parallelism.tp > 1
        # stops with a message and the model scales over data-parallel ranks.
        tp_plan=None,
        # Its transforms are not encoder rows and decoder rows: native export only.
        export_layout=None,
        description="Mixture of linear transforms: sparsely gated low-rank maps in groups of ranks.",
    )
)

__all__ = ["MixtureOfLinearTransforms", "build_molt", "molt_groups"]
