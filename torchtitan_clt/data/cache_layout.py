"""The activation cache's files, shared by its writer (``cache_writer.py``) and its reader
(``cache.py``): ``meta.json`` and shards ``shard_NNNNN.safetensors`` (layout: ``cache.py``)."""

from __future__ import annotations

from pathlib import Path

META_FILE = "meta.json"
FORMAT = 2  # meta.json's "format": the block layout described in cache.py


def shard_path(folder: Path | str, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.safetensors"
