from torchtitan_clt.protocols.model_spec import ModelSpec, get_model_spec, register_model_spec
from torchtitan_clt.protocols.registry import (
    activation_registry,
    data_source_registry,
    import_custom_modules,
    model_registry,
)

__all__ = [
    "ModelSpec",
    "get_model_spec",
    "register_model_spec",
    "activation_registry",
    "data_source_registry",
    "import_custom_modules",
    "model_registry",
]
