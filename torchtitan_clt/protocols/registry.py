"""Name -> builder registries for families, activations and activation sources.

User code registers its own entries from a module named in ``job.custom_import``; a duplicate
name is an error so that a typo cannot silently replace a built-in. Built-ins are imported on
lookup: asking for ``clt`` imports ``models/clt`` and nothing of the other families.
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
    def __init__(self, kind: str, config_field: str, builtins: dict[str, str] | str):
        """``builtins``: name -> the module that registers it, or one module registering them all."""
        self.kind = kind
        self.config_field = config_field
        self._items: dict[str, T] = {}
        self._builtins = builtins

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name.")
        self._items[name] = item
        return item

    def _load(self, name: str | None) -> None:
        if isinstance(self._builtins, str):
            importlib.import_module(self._builtins)
        elif name is None:
            for module in self._builtins.values():
                importlib.import_module(module)
        elif name not in self._items and name in self._builtins:
            importlib.import_module(self._builtins[name])

    def get(self, name: str) -> T:
        self._load(name)
        if name not in self._items:
            self._load(None)
            known = [
                f"{n} ({d})" if (d := getattr(self._items[n], "description", "")) else n for n in self.names()
            ]
            raise ConfigError(
                f"{self.config_field} = {name!r} is not a registered {self.kind}: choose one of "
                f"{', '.join(known)}, or register your own from a module named in job.custom_import."
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._load(None)
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load(name)
        return name in self._items


_FAMILIES = {
    name: f"torchtitan_clt.models.{pkg}"
    for name, pkg in {
        "clt": "clt",
        "plt": "plt",
        "sae": "sae",
        "molt": "molt",
        "matryoshka_clt": "matryoshka",
    }.items()
}
# ModelSpec objects, keyed by family name (model.name).
model_registry: Registry[Any] = Registry("model family", "model.name", _FAMILIES)
# Activation classes: cls(args: TranscoderArgs) -> nn.Module, keyed by model.activation.
activation_registry: Registry[Callable[..., Any]] = Registry(
    "activation", "model.activation", "torchtitan_clt.models.activations"
)
# Activation sources: builder(job_config, ctx: SourceContext) -> ActivationSource, keyed by data.source.
data_source_registry: Registry[Callable[..., Any]] = Registry(
    "activation source", "data.source", "torchtitan_clt.data"
)


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
