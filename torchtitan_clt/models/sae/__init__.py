from torchtitan_clt.models.sae.model import SparseAutoencoder, build_sae
from torchtitan_clt.models.sae.parallelize import parallelize_sae
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

register_model_spec(
    ModelSpec(
        name="sae",
        build_fn=build_sae,
        parallelize_fn=parallelize_sae,
        description="Sparse autoencoder: reads and writes one hook point (data.hook_in = data.hook_out).",
    )
)

__all__ = ["SparseAutoencoder", "build_sae"]
