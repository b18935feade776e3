"""Name -> builder registries for families, activations and activation sources.

User code registers its own entries from a module named in ``job.custom_import``; a duplicate
name is an error so that a typo cannot silently replace a built-in.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from torchtitan_clt.config.manager import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_field: str):
        self.kind = kind
        self.config_field = config_field
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name.")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        _load_builtins()
        if name not in self._items:
            raise ConfigError(
                f"{self.config_field} = {name!r} is not a registered {self.kind}: choose one of "
                f"{', '.join(sorted(self._items))}, or register your own from a module named in "
                "job.custom_import."
            )
        return self._items[name]

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._items


# ModelSpec objects, keyed by family name (model.name).
model_registry: Registry[Any] = Registry("model family", "model.name")
# Activation classes: cls(args: TranscoderArgs) -> nn.Module, keyed by model.activation.
activation_registry: Registry[Callable[..., Any]] = Registry("activation", "model.activation")
# Activation sources: builder(job_config, ctx: SourceContext) -> ActivationSource, keyed by data.source.
data_source_registry: Registry[Callable[..., Any]] = Registry("activation source", "data.source")

_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("torchtitan_clt.models")
        importlib.import_module("torchtitan_clt.data")


def import_custom_modules(modules: list[str]) -> None:
    """Import ``job.custom_import`` entries: dotted module names or paths to ``.py`` files."""
    for mod in modules:
        try:
            if mod.endswith(".py"):
                path = Path(mod)
                if not path.is_file():
                    raise ConfigError(f"job.custom_import: file {mod!r} does not exist.")
                name = "torchtitan_clt_custom_" + path.stem
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(mod)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"job.custom_import: cannot import {mod!r} ({e}); give a module on PYTHONPATH or a .py path."
            ) from e
