"""Packing by hand; StatefulDataLoader state round trips (with and without workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import PackedTokens, build_token_loader

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tiny_llama"))


def _jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_packing_by_hand(tmp_path, tok):
    spec = TextSpec(_jsonl(tmp_path / "d.jsonl", ["ab", "cde", "   ", "fghij"]))
    ids = {c: tok(c, add_special_tokens=False)["input_ids"] for c in "abcdefghij"}
    assert all(len(v) == 1 for v in ids.values())  # byte-level test tokenizer: one token per letter
    B, E = tok.bos_token_id, tok.eos_token_id
    a, b, c, d, e, f, g, h, i, j = (ids[ch][0] for ch in "abcdefghij")
    # Stream: a b E | c d e E | (blank doc: nothing) | f g h i j E, cut into BOS + 3 tokens.
    want = [[B, a, b, E], [B, c, d, e], [B, E, f, g], [B, h, i, j], [B, E, a, b]]
    ds = PackedTokens(spec, tok, seq_len=4)  # loops: the 5th window starts the 2nd epoch
    got = [w.tolist() for _, w in zip(range(5), ds)]
    assert got == want
    finite = PackedTokens(spec, tok, seq_len=4, loop=False)
    assert [w.tolist() for w in finite] == want[:4]  # the partial last window is dropped


def test_bos_falls_back_to_eos(tmp_path, tok):
    class NoBos:
        bos_token_id = None
        eos_token_id = 7

        def __call__(self, texts, **kw):
            return {"input_ids": [[ord(ch) for ch in t] for t in texts]}

    ds = PackedTokens(TextSpec(_jsonl(tmp_path / "d.jsonl", ["xy"])), NoBos(), seq_len=4)
    assert next(iter(ds)).tolist() == [7, ord("x"), ord("y"), 7]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_round_trip(tok, workers):
    # Shakespeare paragraphs, two ranks; save after a few batches, resume in a fresh loader.
    kw = dict(
        spec=TextSpec("shakespeare"),
        tokenizer=tok,
        seq_len=48,
        batch_size=3,
        dp_rank=1,
        dp_degree=2,
        num_workers=workers,
    )
    dl = build_token_loader(**kw)
    it = iter(dl)
    for _ in range(5):
        next(it)
    sd = dl.state_dict()
    want = [next(it) for _ in range(12)]
    dl2 = build_token_loader(**kw)
    dl2.load_state_dict(sd)
    got = [b for _, b in zip(range(12), dl2)]
    assert all(b.shape == (3, 48) and b.dtype == torch.long for b in got)
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    assert (torch.stack(got)[:, :, 0] == tok.bos_token_id).all()


def test_ranks_read_different_windows(tok):
    first = [
        next(iter(build_token_loader(TextSpec("shakespeare"), tok, 32, 4, dp_rank=r, dp_degree=2)))
        for r in range(2)
    ]
    assert not torch.equal(first[0], first[1])


def test_workers_read_every_file(tmp_path, tok):
    # A dataset of several files read by 2 workers: the workers split the documents by global
    # index (shards 0 and 1 of 2), not the files (what `datasets` does by itself inside a worker).
    for f in range(3):
        _jsonl(tmp_path / f"part{f}.jsonl", [f"file{f} doc{i:02d}" for i in range(12)])
    spec = TextSpec(str(tmp_path))
    got = [w for b in build_token_loader(spec, tok, 8, 1, num_workers=2, loop=False) for w in b.tolist()]
    want = [
        w.tolist() for s in range(2) for w in PackedTokens(spec, tok, 8, dp_rank=s, dp_degree=2, loop=False)
    ]
    assert sorted(got) == sorted(want) and len(want) > 20
