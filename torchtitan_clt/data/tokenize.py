"""Tokenize documents and pack them into fixed windows; the ``StatefulDataLoader`` over them.

A window is ``[BOS, t_1, ..., t_{seq_len-1}]``: BOS (the tokenizer's, or EOS when it has none)
then the next tokens of the document stream, each document followed by EOS. A document longer
than a window continues in the next window (after that window's BOS).

The text is split into ``num_shards`` *virtual shards* (``text.py``: by global document index, or
a Hugging Face stream by its files), each packed on its own, so a shard's windows do not depend on
who reads it. Reader ``r`` of ``R`` (data-parallel ×
tensor-parallel ranks) owns a contiguous block of shards (``reader_shards``), its DataLoader workers
split them, and a worker yields windows round-robin over its shards. The state is one position per
shard, so a run can resume on another reader count with every shard where it stopped (the number of
shards is fixed for the run). With the default ``num_shards = readers × workers`` each worker reads
one shard: reader ``r``'s worker ``w`` reads shard ``r × workers + w``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_clt.data.text import DocumentStream, TextSpec

TOKENIZE_CHUNK = 64  # documents per tokenizer call


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(bos, eos) ids; BOS falls back to EOS (GPT-2 style tokenizers have only EOS)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None or eos is None:
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has neither BOS nor EOS; set them in its "
            "tokenizer_config.json."
        )
    return int(bos), int(eos)


def reader_shards(reader: int, readers: int, num_shards: int) -> list[int]:
    """The text shards reader ``reader`` of ``readers`` owns: ``s`` with ``s * readers // num_shards == reader``."""
    return [s for s in range(num_shards) if s * readers // num_shards == reader]


def default_num_shards(readers: int, num_workers: int) -> int:
    return readers * max(1, num_workers)


class _ShardPacker:
    """Windows of one text shard; ``state`` (document position before the current document, token
    offset inside it, windows made) is updated in place before each window is yielded."""

    def __init__(self, docs: DocumentStream, tokenizer: Any, seq_len: int, bos: int, eos: int, state: dict):
        self.docs, self.tokenizer, self.seq_len, self.bos, self.eos = docs, tokenizer, seq_len, bos, eos
        self.state = state

    def _documents(self) -> Iterator[tuple[dict, list[int]]]:
        """``(stream state before the document, its tokens + EOS)``, tokenized in chunks.

        One tokenizer call per chunk of documents lets a fast tokenizer use its own threads.
        """
        docs = iter(self.docs)
        while True:
            states, texts = [], []
            for _ in range(TOKENIZE_CHUNK):
                states.append(self.docs.state_dict())
                try:
                    texts.append(next(docs)[1])
                except StopIteration:
                    states.pop()
                    break
            if not texts:
                return
            keep = [i for i, t in enumerate(texts) if t.strip()]  # blank documents add nothing
            ids = self.tokenizer([texts[i] for i in keep], add_special_tokens=False, verbose=False)
            tokens: list[list[int]] = [[] for _ in texts]
            for i, seq in zip(keep, ids["input_ids"]):
                tokens[i] = list(seq) + [self.eos]
            yield from zip(states, tokens)
            if len(texts) < TOKENIZE_CHUNK:
                return

    def __iter__(self) -> Iterator[torch.Tensor]:
        st = self.state
        self.docs.load_state_dict(st["docs"])
        docs = self._documents()
        tokens: list[int] = []
        pos = 0
        skip = st["offset"]  # a resumed document is re-read and its packed tokens skipped
        while True:
            window = [self.bos]
            while len(window) < self.seq_len:
                if pos >= len(tokens):
                    try:
                        doc_state, tokens = next(docs)
                    except StopIteration:
                        return  # finite stream (held-out): the partial window is dropped
                    st["docs"] = doc_state
                    pos, skip = skip, 0
                    continue
                take = min(self.seq_len - len(window), len(tokens) - pos)
                window.extend(tokens[pos : pos + take])
                pos += take
            st["offset"] = pos
            st["windows"] += 1
            yield torch.tensor(window, dtype=torch.long)


class PackedTokens(IterableDataset):
    """Windows of ``seq_len`` token ids from one reader's text shards (``Stateful``).

    With DataLoader workers, worker ``w`` of ``n`` packs the reader's shards ``w, w + n, ...``; the
    loader keeps one state per worker. A worker's state is, per shard, the document position before
    the current document plus the token offset inside it (nothing tokenized is stored), and which
    of its shards gives the next window. ``start`` (shard -> state) sets where shards begin when no
    state was loaded (a resume on another reader count).
    """

    def __init__(
        self,
        spec: TextSpec,
        tokenizer: Any,
        seq_len: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        held_out: bool = False,
        loop: bool = True,
        num_shards: int = 0,
    ):
        if seq_len < 2:
            raise ValueError(f"data.seq_len = {seq_len}: need at least 2 (BOS + one token).")
        self.spec, self.tokenizer, self.seq_len = spec, tokenizer, seq_len
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.num_shards = num_shards or dp_degree
        if self.num_shards < dp_degree:
            raise ValueError(f"{self.num_shards} text shards cannot be split over {dp_degree} readers.")
        self.held_out, self.loop = held_out, loop
        self.bos, self.eos = special_ids(tokenizer)
        self.start: dict[int, dict[str, Any]] = {}
        self._state: dict[str, Any] | None = None  # {"shards": {shard: state}, "next": i}

    def worker_shards(self) -> list[int]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return reader_shards(self.dp_rank, self.dp_degree, self.num_shards)[w::n]

    def _stream(self, shard: int) -> DocumentStream:
        return DocumentStream(self.spec, shard, self.num_shards, held_out=self.held_out, loop=self.loop)

    def _initial(self) -> dict[str, Any]:
        shards = {}
        for s in self.worker_shards():
            if s in self.start:
                shards[s] = _copy_state(self.start[s])
            else:
                shards[s] = {"docs": self._stream(s).state_dict(), "offset": 0, "windows": 0}
        return {"shards": shards, "next": 0}

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._state is None:
            self._state = self._initial()
        st = self._state
        shards = sorted(st["shards"])
        packers = [
            iter(
                _ShardPacker(
                    self._stream(s), self.tokenizer, self.seq_len, self.bos, self.eos, st["shards"][s]
                )
            )
            for s in shards
        ]
        while packers:
            i = st["next"] % len(packers)
            try:
                window = next(packers[i])
            except StopIteration:  # a finite shard ended: the others go on
                packers.pop(i)
                continue
            st["next"] = (i + 1) % len(packers)
            yield window

    @property
    def windows(self) -> int:
        return sum(s["windows"] for s in self.state_dict()["shards"].values())

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            self._state = self._initial()
        return {
            "shards": {s: _copy_state(v) for s, v in self._state["shards"].items()},
            "next": self._state["next"],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if "docs" in sd:  # written before virtual shards: one shard per worker
            sd = {"shards": {int(sd["docs"]["shard"]): sd}, "next": 0}
        shards = {int(s): _copy_state(v) for s, v in sd["shards"].items()}
        mine = self.worker_shards()
        if sorted(shards) != mine:
            raise ValueError(
                f"Token loader state for text shards {sorted(shards)}, but this worker reads {mine} "
                f"(reader {self.dp_rank} of {self.dp_degree}, {self.num_shards} shards)."
            )
        self._state = {"shards": shards, "next": int(sd["next"])}


def _copy_state(st: dict[str, Any]) -> dict[str, Any]:
    return {"docs": dict(st["docs"]), "offset": int(st["offset"]), "windows": int(st["windows"])}


def shard_states(loader_state: Any) -> dict[int, dict[str, Any]]:
    """Every text shard's packing state inside a ``StatefulDataLoader`` state (all its workers)."""
    found: dict[int, dict[str, Any]] = {}
    if isinstance(loader_state, dict):
        if "shards" in loader_state and "next" in loader_state:
            return {int(s): _copy_state(v) for s, v in loader_state["shards"].items()}
        for v in loader_state.values():
            found.update(shard_states(v))
    return found


def build_token_loader(
    spec: TextSpec,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_degree: int = 1,
    num_workers: int = 0,
    held_out: bool = False,
    loop: bool = True,
    num_shards: int = 0,
) -> StatefulDataLoader:
    """Batches of windows, ``LongTensor [batch_size, seq_len]``, from reader ``dp_rank``'s shards.

    ``num_shards = 0``: ``dp_degree × max(1, num_workers)``, one shard per worker.
    """
    if num_workers > 0:
        # Fork after the tokenizer used its thread pool would deadlock it; workers tokenize instead.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    num_shards = num_shards or default_num_shards(dp_degree, num_workers)
    ds = PackedTokens(
        spec, tokenizer, seq_len, dp_rank, dp_degree, held_out=held_out, loop=loop, num_shards=num_shards
    )
    return StatefulDataLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=True)
