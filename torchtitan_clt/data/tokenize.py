"""Tokenize documents and pack them into fixed windows; the ``StatefulDataLoader`` over them.

A window is ``[BOS, t_1, ..., t_{seq_len-1}]``: BOS (the tokenizer's, or EOS when it has none)
then the next tokens of the document stream, each document followed by EOS. A document longer
than a window continues in the next window (after that window's BOS).
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


class PackedTokens(IterableDataset):
    """Windows of ``seq_len`` token ids from one data-parallel rank's share of the text (``Stateful``).

    With DataLoader workers, each worker reads its own sub-share; the loader keeps one state per
    worker. The state is the document position before the current document plus the token offset
    inside it, so nothing tokenized is stored.
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
    ):
        if seq_len < 2:
            raise ValueError(f"data.seq_len = {seq_len}: need at least 2 (BOS + one token).")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.bos, self.eos = special_ids(tokenizer)
        self.docs = DocumentStream(spec, held_out=held_out, loop=loop)
        self._doc_state = self.docs.state_dict()  # stream state before the current document
        self._offset = 0  # tokens of the current document already packed
        self.windows = 0

    def _set_shard(self) -> None:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        self.docs.set_shard(self.dp_rank * n + w, self.dp_degree * n)

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
        self._set_shard()
        self.docs.load_state_dict(self._doc_state)
        docs = self._documents()
        tokens: list[int] = []
        pos = 0
        skip = self._offset  # a resumed document is re-read and its packed tokens skipped
        while True:
            window = [self.bos]
            while len(window) < self.seq_len:
                if pos >= len(tokens):
                    try:
                        self._doc_state, tokens = next(docs)
                    except StopIteration:
                        return  # finite stream (held-out): the partial window is dropped
                    pos, skip = skip, 0
                    continue
                take = min(self.seq_len - len(window), len(tokens) - pos)
                window.extend(tokens[pos : pos + take])
                pos += take
            self._offset = pos
            self.windows += 1
            yield torch.tensor(window, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"docs": dict(self._doc_state), "offset": self._offset, "windows": self.windows}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._set_shard()
        self._doc_state = dict(sd["docs"])
        self.docs.load_state_dict(self._doc_state)
        self._offset, self.windows = int(sd["offset"]), int(sd["windows"])


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
) -> StatefulDataLoader:
    """Batches of windows, ``LongTensor [batch_size, seq_len]``, from this rank's share."""
    if num_workers > 0:
        # Fork after the tokenizer used its thread pool would deadlock it; workers tokenize instead.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ds = PackedTokens(spec, tokenizer, seq_len, dp_rank, dp_degree, held_out=held_out, loop=loop)
    return StatefulDataLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=True)
