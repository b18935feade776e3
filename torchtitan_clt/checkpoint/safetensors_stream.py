"""Safetensors files written a piece at a time, and the sharded layout with its index.

``StreamedFile`` writes the bytes ``safetensors.torch.save_file`` would write (its header, its
tensor order: dtype, then name; no padding between tensors), but a tensor, or one row of a
layer-stacked tensor, is written whenever it is ready: the header is laid out from the shapes
first and every piece goes to its offset. So an exporter can hold one source layer at a time.

``StreamedExport`` is Hugging Face's sharded layout: ``model-00001-of-0000N.safetensors`` and
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name:
file}}``), tensors assigned to files in the model's order and a file closed once the next tensor
would take it over the cap; a tensor bigger than the cap gets a file of its own (as transformers
does). A model under the cap is one ``model.safetensors``, byte for byte what ``save_file`` gives.
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
# Bytes of one cast piece when a tensor is written in another dtype (a bound on the extra memory).
CAST_CHUNK_BYTES = 256 * 2**20
INDEX_FILE = "model.safetensors.index.json"
SHARD_GLOB = "model-*-of-*.safetensors"

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@functools.cache
def _dtype_rank(dtype: torch.dtype) -> int:
    """Where ``dtype`` sorts in a file: asked of the installed safetensors itself (it orders by
    its dtype enum, which differs between releases), by saving one element of each dtype."""
    from safetensors.torch import save

    names = {f"t{i:02d}": dt for i, dt in enumerate(DTYPE_CODES)}
    blob = save({n: torch.zeros(1, dtype=dt) for n, dt in names.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    order = sorted(names, key=lambda k: header[k]["data_offsets"][0])
    return order.index(next(k for k, dt in names.items() if dt == dtype))


def layout(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (length + JSON header, space-padded to 8) and each tensor's data
    offset from the end of them, as ``safetensors`` lays them out."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this host is not.")
    ordered = sorted(specs, key=lambda s: (_dtype_rank(s.dtype), s.name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, at = {}, 0
    for s in ordered:
        header[s.name] = {
            "dtype": DTYPE_CODES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [at, at + s.nbytes],
        }
        offsets[s.name] = at
        at += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class StreamedFile:
    """One safetensors file whose tensors are written in any order, whole or row by row."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        head, self.offsets = layout(specs, metadata)
        self.base = len(head)
        self.written = dict.fromkeys(self.specs, 0)
        self.size = self.base + sum(s.nbytes for s in specs)
        self.f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.f.write(head)
        self.f.truncate(self.size)

    def write(self, name: str, t: torch.Tensor, row: int | None = None) -> None:
        """Tensor ``name`` whole, or its row ``row`` (index on the first axis). A floating-point
        ``t`` of another dtype is cast to the file's a chunk at a time (``CAST_CHUNK_BYTES``), so
        an fp32 layer written as bf16 never has a whole bf16 copy beside it."""
        spec = self.specs[name]
        want = spec.shape if row is None else spec.shape[1:]
        castable = t.is_floating_point() and spec.dtype.is_floating_point
        if tuple(t.shape) != tuple(want) or (t.dtype != spec.dtype and not castable):
            raise ValueError(f"{name}{'' if row is None else f'[{row}]'}: got {t.dtype} {list(t.shape)}, "
                             f"the file holds {spec.dtype} {list(want)}.")  # fmt: skip
        flat = t.detach().reshape(-1)
        size = torch.empty((), dtype=spec.dtype).element_size()
        at = self.base + self.offsets[name] + (0 if row is None else row * flat.numel() * size)
        step = flat.numel() if t.dtype == spec.dtype and t.device.type == "cpu" else CAST_CHUNK_BYTES // size
        self.f.seek(at)
        for lo in range(0, flat.numel(), max(1, step)):
            self._put(flat[lo : lo + step].to("cpu", spec.dtype).contiguous())
        self.written[name] += flat.numel() * size

    def _put(self, piece: torch.Tensor) -> None:
        """Append ``piece``'s bytes at the file's position (the only file I/O of a write)."""
        self.f.write(memoryview(piece.view(torch.uint8).numpy()))

    def close(self) -> None:
        self.f.close()
        short = [n for n, s in self.specs.items() if self.written[n] != s.nbytes]
        if short:
            self.path.unlink()
            raise RuntimeError(
                f"{self.path.name}: {', '.join(short)} not written whole; the file was removed."
            )


def save_streamed(
    tensors: dict[str, torch.Tensor], path: Path | str, dtype: torch.dtype | None = None
) -> None:
    """``safetensors.torch.save_file(tensors, path)`` with floating-point tensors cast to ``dtype``
    (when given) a chunk at a time, and no in-memory copy of the file's bytes (save_file makes
    one: at clt_8b a source layer's decoder is 8 GiB in bf16)."""

    def spec(k: str, v: torch.Tensor) -> TensorSpec:
        cast = dtype is not None and v.is_floating_point()
        return TensorSpec(k, dtype if cast else v.dtype, tuple(v.shape))

    out = StreamedFile(Path(path), [spec(k, v) for k, v in tensors.items()])
    for k, v in tensors.items():
        out.write(k, v)
    out.close()


def plan_files(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Tensors, in order, into files of at most ``max_bytes`` (a bigger tensor alone in its own)."""
    files: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if files[-1] and size + s.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(s)
        size += s.nbytes
    return files


def file_names(n: int) -> list[str]:
    return [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class StreamedExport:
    """The weights of an export folder as one file or as shards with an index (module docstring)."""

    def __init__(self, folder: Path, specs: list[TensorSpec], metadata: dict[str, str], max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(
                f"the file cap must be positive (got {max_bytes} bytes): set checkpoint.export_max_file_gb > 0."
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        groups = plan_files(specs, max_bytes)
        names = file_names(len(groups))
        for stale in [self.folder / WEIGHTS_FILE, self.folder / INDEX_FILE, *self.folder.glob(SHARD_GLOB)]:
            if stale.name not in names and stale.exists():
                stale.unlink()  # a previous export of another size must not leave files behind
        self.files = [StreamedFile(self.folder / n, g, metadata) for n, g in zip(names, groups)]
        self.where = {s.name: f for f, g in zip(self.files, groups) for s in g}
        self.total = sum(s.nbytes for s in specs)

    def write(self, name: str, t: torch.Tensor, row: int | None = None) -> None:
        self.where[name].write(name, t, row)

    def close(self) -> list[Path]:
        for f in self.files:
            f.close()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {n: f.path.name for n, f in self.where.items()},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [f.path for f in self.files]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an export folder: ``model.safetensors``, or the files its index names.
    FileNotFoundError when neither is there or a named shard is missing."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: {INDEX_FILE} names {', '.join(missing)}, which is missing: the export is "
                "incomplete (a download or copy that stopped early?); fetch or export it again."
            )
        return [folder / n for n in names]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    raise FileNotFoundError(
        f"{folder / WEIGHTS_FILE} is missing: {folder} is not a complete native export (it needs "
        f"config.json and {WEIGHTS_FILE}, or {INDEX_FILE} and the files it names)."
    )
