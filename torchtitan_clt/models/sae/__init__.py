from torchtitan_clt.models.sae.model import SparseAutoencoder, build_sae
from torchtitan_clt.protocols.model_spec import ModelSpec, register_model_spec

# parallelize_fn: models/sae/parallelize.py (the distributed part; PLT's plan) plugs in here.
register_model_spec(
    ModelSpec(
        name="sae",
        build_fn=build_sae,
        parallelize_fn=None,
        description="Sparse autoencoder: reads and writes one hook point (data.hook_in = data.hook_out).",
    )
)

__all__ = ["SparseAutoencoder", "build_sae"]
