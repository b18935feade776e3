"""torchtitan_clt: a TorchTitan-style trainer for crosslayer transcoders, transcoders and SAEs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from torchtitan_clt.protocols.transcoder import Transcoder


def load_pretrained(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transcoder:
    """Load a native export folder (``outputs/<job>/export``: one ``model.safetensors``, or the
    shards that ``model.safetensors.index.json`` names), a circuit-tracer folder or a Hub
    repo (``"org/name"``, ``"org/name@revision"``, ``"hf://org/name/sub/folder"``) as a
    ``Transcoder`` in eval mode.

    ``model.encode(x)`` / ``model.decode(acts, x)`` / ``model(x)`` take and give raw activations (x
    in decode: the skip path of a dictionary that has one),
    ``x  # [N, n_layers, d_in]``. Imports torch lazily so that ``import torchtitan_clt`` stays light.
    """
    from torchtitan_clt.checkpoint.export import load_pretrained as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["load_pretrained"]
