"""Hugging Face streams read by files: each reader opens only its own files, exactly once in all.

No network: ``datasets.load_dataset`` is replaced by a local streaming dataset of 8 files, taken
through the same code path a hub name takes (``text.open_dataset``'s last branch). The counting
stand-in is an ``IterableDataset.from_generator`` over a list of files (``n_shards`` = 8) whose
generator counts the rows it produces per file: what a reader downloads and parses. A second
stand-in is the real parquet builder, streamed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest
import test_data_resume_ranks as rr
import torch
from transformers import AutoTokenizer

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data import load_llm
from torchtitan_clt.data import text as text_mod
from torchtitan_clt.data.text import DocumentStream, OpenedText, TextSpec
from torchtitan_clt.data.tokenize import PackedTokens, build_token_loader, reader_shards, shard_states

ASSETS = Path(__file__).resolve().parents[1] / "assets"
HUB = "someorg/eight-files"
FILES = 8
ROWS = [120 + 25 * f for f in range(FILES)]  # 1660 rows; files 4..7 hold two held-out rows each


def _doc(f: int, r: int) -> str:
    return f"f{f}r{r:03d}."


def _is_held(r: int) -> bool:  # the rule, written out: row r of its file, every 100th
    return r % 100 == 99


TRAIN = {_doc(f, r) for f in range(FILES) for r in range(ROWS[f]) if not _is_held(r)}
HELD = {_doc(f, r) for f in range(FILES) for r in range(ROWS[f]) if _is_held(r)}


class Counted:
    """A streaming dataset of ``FILES`` files whose rows are counted as the source produces them."""

    def __init__(self, docs=_doc, rows=ROWS):
        self.produced: Counter[int] = Counter()  # file -> rows produced
        self.docs, self.rows = docs, rows

        def gen(files):
            for f in files:
                for r in range(self.rows[f]):
                    self.produced[f] += 1
                    yield {"text": self.docs(f, r), "file": f}

        self.ds = datasets.IterableDataset.from_generator(gen, gen_kwargs={"files": list(range(len(rows)))})

    def take(self) -> Counter[int]:
        out, self.produced = self.produced, Counter()
        return out


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset(HUB, ..., streaming=True)`` returns the counted local stand-in."""
    src = Counted()

    def load_dataset(name, config=None, split=None, streaming=False, **kw):
        assert (name, streaming) == (HUB, True)
        return src.ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return src


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(ASSETS / "tiny_llama"))


def _docs(shard: int, shards: int, **kw) -> list[str]:
    return [d for _, d in DocumentStream(TextSpec(HUB), shard, shards, loop=False, **kw)]


def _own_files(reader: int, readers: int, shards: int) -> set[int]:
    """Independent reference: shard s owns the files f % shards == s; the reader its block of shards."""
    return {f for f in range(FILES) if (f % shards) * readers // shards == reader}


@pytest.mark.parametrize("readers,shards", [(1, 1), (2, 2), (4, 4), (1, 8), (2, 8), (4, 8)])
def test_readers_read_only_their_files_and_every_row_once(hub, readers, shards):
    seen: list[str] = []
    for r in range(readers):
        hub.take()
        for s in reader_shards(r, readers, shards):
            seen += _docs(s, shards)
        produced = hub.take()
        own = _own_files(r, readers, shards)
        assert set(produced) == own  # only its own files were opened
        assert dict(produced) == {f: ROWS[f] for f in own}  # each parsed once, whole
    assert len(seen) == len(set(seen)) and set(seen) == TRAIN  # every training row once, no held-out


def test_the_global_layout_scans_everything(hub):
    # Before: the same data read as one sequence (what the hub path did) costs every reader all rows.
    def legacy(spec):
        return OpenedText(hub.ds, "text", by_files=False)

    kept = 0
    for s in range(4):
        kept += len([d for _, d in DocumentStream(TextSpec(HUB), s, 4, loop=False, opener=legacy)])
        assert sum(hub.take().values()) == sum(ROWS) == 1660  # every reader parses every row
    assert kept == 1660 - 16  # and keeps a quarter (global indices 99, 199, ... held out)


def test_packed_readers_parse_only_their_rows(hub, tok):
    # Through the token loader: 2 readers of 8 shards (no workers, so the counter is this process's).
    for r in range(2):
        hub.take()
        windows = list(PackedTokens(TextSpec(HUB), tok, 16, dp_rank=r, dp_degree=2, num_shards=8, loop=False))
        assert len(windows) > 50
        assert dict(hub.take()) == {f: ROWS[f] for f in _own_files(r, 2, 8)}


@pytest.mark.parametrize("train_shards", [4, 8, 16])  # 16 > 8 files: every reader scans everything
def test_held_out_never_in_training(hub, caplog, monkeypatch, train_shards):
    monkeypatch.setattr(text_mod, "_LOGGED_SCANS", set())  # the once-per-process log, afresh
    with caplog.at_level(logging.WARNING, logger=text_mod.__name__):
        train = [d for s in range(train_shards) for d in _docs(s, train_shards)]
    scans = [r for r in caplog.records if "parses the whole stream" in r.getMessage()]
    assert len(scans) == (1 if train_shards > FILES else 0)  # logged once, not once per shard
    assert len(train) == len(set(train)) and set(train) == TRAIN
    if train_shards > FILES:  # dealt round-robin: shares differ by at most one row
        sizes = Counter(s for s in range(train_shards) for _ in _docs(s, train_shards))
        assert max(sizes.values()) - min(sizes.values()) <= 1
    for eval_shards in (1, 3):  # the evaluator reads with its own shard count (1, or its ranks)
        held = [d for s in range(eval_shards) for d in _docs(s, eval_shards, held_out=True)]
        assert sorted(held) == sorted(HELD) and len(HELD) == 12


def test_parquet_builder_same_documents(tmp_path, monkeypatch):
    # The real parquet builder, streamed (n_shards = files), through the hub path.
    files = []
    for f in range(FILES):
        path = tmp_path / f"part-{f:05d}.parquet"
        datasets.Dataset.from_dict({"text": [_doc(f, r) for r in range(ROWS[f])]}).to_parquet(str(path))
        files.append(str(path))
    real = datasets.load_dataset
    ds = real("parquet", data_files=files, split="train", streaming=True)
    assert ds.n_shards == FILES
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: ds)
    for s in range(3):
        got = _docs(s, 3)
        assert got == [_doc(f, r) for f in range(s, FILES, 3) for r in range(ROWS[f]) if not _is_held(r)]


@pytest.mark.parametrize("shards", [3, 16])  # shard 1 of 3: files 1, 4, 7 (655 training rows)
@pytest.mark.parametrize("with_hf_state", [True, False])
def test_stream_resume_mid_file_and_across_epochs(hub, shards, with_hf_state):
    a = DocumentStream(TextSpec(HUB), 1, shards)
    it = iter(a)
    head = [next(it) for _ in range(200)]  # 3 shards: inside file 4; 16: in the second epoch
    sd = a.state_dict()
    assert sd["layout"] == "files" and sd["row"] > 0 and sd["file"] == (4 if shards == 3 else 7)
    rest = [next(it) for _ in range(600)]  # crosses the end of the shard's data: an epoch starts over
    assert a.epoch >= 1 and rest[-1][1] in {d for _, d in head}
    if not with_hf_state:
        sd.pop("hf_state")
    b = DocumentStream(TextSpec(HUB), 1, shards)
    b.load_state_dict(sd)
    hub.take()
    it_b = iter(b)
    assert next(it_b) == rest[0]
    if shards == 3:  # the resumed reader reopens only the file it stopped in, from there
        assert set(hub.take()) == {sd["file"]}
    assert [next(it_b) for _ in range(599)] == rest[1:]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_round_trip(hub, tok, workers):
    kw = dict(spec=TextSpec(HUB), tokenizer=tok, seq_len=24, batch_size=3, dp_rank=1, dp_degree=2)
    dl = build_token_loader(num_workers=workers, **kw)
    it = iter(dl)
    for _ in range(7):
        next(it)
    sd = dl.state_dict()
    want = [next(it) for _ in range(12)]
    dl2 = build_token_loader(num_workers=workers, **kw)
    dl2.load_state_dict(sd)
    got = [b for _, b in zip(range(12), dl2)]
    assert all(torch.equal(x, y) for x, y in zip(want, got)) and len(got) == 12


@pytest.mark.parametrize("old,new", [(2, 4), (4, 1), (1, 3)])
def test_resume_on_other_readers_every_window_once(hub, tok, old, new):
    # 8 shards; old readers take a few windows each, their shard states go to the new readers,
    # which read to the end: the union is each shard's own packing, every window once.
    spec, S = TextSpec(HUB), 8

    def packed(r, n, start=None):
        ds = PackedTokens(spec, tok, 16, dp_rank=r, dp_degree=n, num_shards=S, loop=False)
        ds.start = start or {}
        return ds

    got: list[tuple[int, ...]] = []
    states: dict = {}
    for r in range(old):
        ds = packed(r, old)
        it = iter(ds)
        got += [tuple(next(it).tolist()) for _ in range(23 + 5 * r)]
        states.update(shard_states(ds.state_dict()))
    for r in range(new):
        got += [tuple(w.tolist()) for w in packed(r, new, states)]
    ref = [tuple(w.tolist()) for s in range(S) for w in packed(s, S)]
    assert Counter(got) == Counter(ref) and len(ref) > 200


def test_old_hub_position_is_refused(hub):
    old = {"epoch": 0, "index": 57, "shard": 0, "num_shards": 2, "held_out": False}  # no layout
    b = DocumentStream(TextSpec(HUB), 0, 2)
    b.load_state_dict(old)
    with pytest.raises(ConfigError, match="older torchtitan_clt.*fresh_start"):
        next(iter(b))
    files = DocumentStream(TextSpec(HUB), 0, 2)
    it = iter(files)
    for _ in range(3):
        next(it)
    moved = files.state_dict()
    c = DocumentStream(TextSpec(HUB), 0, 4)
    with pytest.raises(ConfigError, match="data.text_shards = 2"):
        c.load_state_dict(moved)
    moved["n_files"] = 9
    d = DocumentStream(TextSpec(HUB), 0, 2)
    d.load_state_dict(moved)
    with pytest.raises(ConfigError, match="dataset changed"):
        next(iter(d))


def test_old_position_in_a_one_file_stream_resumes_exactly(monkeypatch):
    # One file: rows are global indices, so a position of the old global layout carries over.
    one = Counted(rows=[430])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: one.ds)
    old_layout = [
        d
        for _, d in DocumentStream(
            TextSpec(HUB), 1, 3, loop=False, opener=lambda s: OpenedText(one.ds, "text")
        )
    ]
    assert [d for _, d in DocumentStream(TextSpec(HUB), 1, 3, loop=False)] == old_layout  # same shard
    a = DocumentStream(TextSpec(HUB), 1, 3, opener=lambda s: OpenedText(one.ds, "text"))
    it = iter(a)
    for _ in range(70):
        next(it)
    sd = a.state_dict()
    assert "layout" not in sd  # as the old code wrote it
    b = DocumentStream(TextSpec(HUB), 1, 3, loop=False)
    b.load_state_dict(sd)
    assert [d for _, d in b] == old_layout[70:]


# -- the stream source, resumed on other data-parallel rank counts (test_data_resume_ranks' pattern)


@pytest.fixture(scope="module")
def llm():
    return load_llm(str(ASSETS / "tiny_llama"))


@pytest.fixture
def numbered_hub(monkeypatch):
    # 8 files of "d00042." documents (rr's windows name their document uniquely).
    per = 375
    src = Counted(docs=lambda f, r: f"d{f * per + r:05d}.", rows=[per] * FILES)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: src.ds)
    return src


@pytest.mark.parametrize("chain", [[(2, 50, 3), (4, 25, 4)], [(4, 30, 3), (1, 70, 3)]])
def test_stream_source_resume_on_other_ranks(numbered_hub, llm, chain):
    cfg = rr._cfg(HUB, text_shards=8)
    served, last = rr._run_chain(cfg, llm, chain)
    taken = rr._check_exactly_once(cfg, llm, served)
    assert sum(taken.values()) > 0
    for s in last:
        s.close()


def test_jsonl_files_keep_the_global_layout(tmp_path):
    # Local files: unchanged (the demo's documents): global index, held out i % 100 == 99.
    for f in range(3):
        (tmp_path / f"p{f}.jsonl").write_text(
            "".join(json.dumps({"text": _doc(f, r)}) + "\n" for r in range(90))
        )
    got = [i for s in range(2) for i, _ in DocumentStream(TextSpec(str(tmp_path)), s, 2, loop=False)]
    assert sorted(got) == [i for i in range(270) if i % 100 != 99]
    a = DocumentStream(TextSpec(str(tmp_path)), 0, 2)
    it = iter(a)
    for _ in range(100):
        next(it)
    assert a.state_dict()["index"] == 201 and "layout" not in a.state_dict()  # a global position


def _as_old_writer(sd):
    """``sd`` as the code before the files layout wrote it: text positions without layout keys."""
    if isinstance(sd, dict):
        if sd.get("layout") == "files":
            return {k: sd[k] for k in ("epoch", "index", "shard", "num_shards", "held_out")}
        return {k: _as_old_writer(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_as_old_writer(v) for v in sd]
    return sd


@pytest.mark.parametrize("prefetch", [False, True])
def test_stream_source_refuses_an_old_hub_checkpoint(numbered_hub, llm, prefetch):
    cfg = rr._cfg(HUB, text_shards=2, prefetch=prefetch)
    (src,) = rr._ranks(cfg, llm, 1)
    for _ in range(3):
        src.next_batch(50)
    sd = src.state_dict()
    src.close()
    (same,) = rr._ranks(cfg, llm, 1)
    same.load_state_dict(sd)  # today's state resumes
    same.next_batch(50)
    same.close()
    (old,) = rr._ranks(cfg, llm, 1)
    old.load_state_dict(_as_old_writer(sd))
    with pytest.raises(ConfigError, match="older torchtitan_clt.*fresh_start"):
        old.next_batch(50)
    old.close()
