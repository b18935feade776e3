"""Activation data: text -> tokens -> LLM activations -> shuffle buffer -> (x, y) batches.

Importing this package registers the built-in sources in ``data_source_registry``.
"""

import warnings

from torchtitan_clt.data.cache import CacheSource, build_cache_source
from torchtitan_clt.data.cache_writer import write_activation_cache
from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.hooks import HOOK_POINTS, d_model, hook_module, n_layers
from torchtitan_clt.data.llm import load_llm
from torchtitan_clt.data.source import (
    ActivationSource,
    SourceContext,
    StreamSource,
    build_eval_token_loader,
    build_stream_source,
)
from torchtitan_clt.data.synthetic import SyntheticSource, build_synthetic_source
from torchtitan_clt.protocols.registry import data_source_registry

data_source_registry.register("stream", build_stream_source)
data_source_registry.register("synthetic", build_synthetic_source)
data_source_registry.register("cache", build_cache_source)

__all__ = [
    "HOOK_POINTS",
    "ActivationExtractor",
    "ActivationSource",
    "CacheSource",
    "SourceContext",
    "StreamSource",
    "SyntheticSource",
    "build_cache_source",
    "build_eval_token_loader",
    "build_stream_source",
    "build_synthetic_source",
    "d_model",
    "hook_module",
    "load_llm",
    "n_layers",
    "write_activation_cache",
]

# torchdata's StatefulDataLoader calls the deprecated torch.set_vital each time a loader is built,
# and torch warns about it (once per loader of a run): nothing a user can act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
