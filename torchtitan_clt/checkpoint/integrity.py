"""What a complete checkpoint holds, so that a damaged one is found before it is loaded.

Rank 0 writes ``files.json`` into ``step-N.tmp/`` just before the rename that completes the
checkpoint: every file's size, and a CRC-32 of each file up to ``CRC_MAX_BYTES`` (the metadata and
the pickled states; the large tensor shards get their size only, so that a save does not read back
gigabytes). ``check`` compares a folder against it and names the first file that differs, is
missing or does not read; a checkpoint written before this file existed is checked for readable
metadata only. A truncated or missing shard is found here; a flipped byte inside a large shard is
not (its size is right), unless it breaks the load itself, which the manager also treats as damage.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from torchtitan_clt.checkpoint.layout import META_FILE

MANIFEST = "files.json"
CRC_MAX_BYTES = 64 << 20


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            files[str(p.relative_to(folder))] = {
                "size": size,
                **({"crc32": _crc(p)} if size <= CRC_MAX_BYTES else {}),
            }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=0))


def check(folder: Path) -> str | None:
    """None if ``folder`` matches its manifest, else what is wrong (naming the file)."""
    try:
        json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{META_FILE} does not read ({e})"
    if not (folder / MANIFEST).is_file():
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST} does not read ({e})"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written (cut off or overwritten)"
        if "crc32" in want and _crc(p) != want["crc32"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


class Damaged(Exception):
    """A complete checkpoint whose files do not match what was written, or do not load."""


def reason(err: BaseException) -> str:
    """A short cause: the OS error ('No space left on device') rather than a wrapped traceback."""
    seen: list[BaseException] = [err]
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
    if isinstance(failures, dict):
        seen += [w[0] if isinstance(w, tuple) else w for w in failures.values()]
    seen += [c for c in (err.__cause__, err.__context__) if c is not None]
    for e in seen:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f": {e.filename}" if e.filename else "")
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
