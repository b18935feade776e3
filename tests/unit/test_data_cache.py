"""Activation cache: written rows equal a direct extraction; the cache source shards, resumes, selects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtitan_clt.config import JobConfig
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data import ActivationExtractor, SourceContext, load_llm, write_activation_cache
from torchtitan_clt.data.cache import main, shard_path
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader
from torchtitan_clt.protocols import data_source_registry

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _cfg(**data) -> JobConfig:
    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), str(ASSETS / "tiny_text.txt")
    d.seq_len, d.llm_batch_size, d.layers = 9, 2, [0, 2, 3]
    d.buffer_tokens, d.buffer_passes = 20, 2
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "c"
    meta = write_activation_cache(_cfg(), folder, rows=100, shard_rows=24, dtype="float32")
    return folder, meta


def test_written_rows_equal_direct_extraction(cache):
    folder, meta = cache
    assert meta["n_shards"] == 4 and meta["rows"] == 96 and meta["layers"] == [0, 2, 3]
    assert json.loads((folder / "meta.json").read_text()) == meta
    assert "BOS" in meta["excluded"] and meta["d_model"] == 64
    x = torch.cat([load_file(str(shard_path(folder, i)))["x"] for i in range(4)])
    y = torch.cat([load_file(str(shard_path(folder, i)))["y"] for i in range(4)])
    assert not shard_path(folder, 4).exists()
    llm, tok = load_llm(str(ASSETS / "tiny_llama"))
    ext = ActivationExtractor(llm, "resid_mid", "mlp_out", [0, 2, 3])
    loader = build_token_loader(TextSpec(str(ASSETS / "tiny_text.txt")), tok, 9, 2)
    pairs = [ext(b) for _, b in zip(range(6), loader)]  # 6 batches × 16 rows = 96
    torch.testing.assert_close(x, torch.cat([p[0] for p in pairs]))
    torch.testing.assert_close(y, torch.cat([p[1] for p in pairs]))


def _source(folder, **kw):
    ctx = {k: kw.pop(k) for k in ("dp_rank", "dp_degree", "seed") if k in kw}
    cfg = _cfg(source="cache", cache_dir=str(folder), **kw)
    return data_source_registry.get("cache")(cfg, SourceContext(**ctx))


def test_cache_source_rows_layers_and_ranks(cache):
    folder, _ = cache
    full = torch.cat([load_file(str(shard_path(folder, i)))["x"] for i in range(4)])
    src = _source(folder, layers=[2, 3])
    assert (src.n_layers, src.layers, src.d_in, src.model_name) == (2, [2, 3], 64, str(ASSETS / "tiny_llama"))
    x, y = src.next_batch(96)
    assert x.shape == (96, 2, 64) and x.dtype == torch.float32
    # Two passes over a refill of 24-row shards: every served row is a cached row (layers 2, 3).
    flat = full[:, 1:].flatten(1)
    assert ((x.flatten(1)[:, None] - flat[None]).abs().amax(-1) == 0).any(1).all()
    for rank in range(2):  # shard i belongs to rank i % 2; a rank serves rows of its shards only
        src = _source(folder, dp_rank=rank, dp_degree=2, layers=[0, 2, 3])
        assert src.order.shards == [rank, rank + 2]
        own = torch.cat([load_file(str(shard_path(folder, i)))["x"] for i in (rank, rank + 2)]).flatten(1)
        x, _ = src.next_batch(48)
        assert ((x.flatten(1)[:, None] - own[None]).abs().amax(-1) == 0).any(1).all()


@pytest.mark.parametrize("stop", [0, 3, 5])
def test_cache_source_resume(cache, stop):
    folder, _ = cache
    ref = _source(folder, seed=4)
    want = [ref.next_batch(10) for _ in range(stop + 8)]
    a = _source(folder, seed=4)
    for _ in range(stop):
        a.next_batch(10)
    b = _source(folder, seed=4)
    b.load_state_dict(a.state_dict())
    for (wx, wy), (gx, gy) in zip(want[stop:], [b.next_batch(10) for _ in range(8)]):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)


def test_cache_errors(cache, tmp_path):
    folder, _ = cache
    with pytest.raises(ConfigError, match="meta.json"):
        _source(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="hook_out"):
        _source(folder, hook_out="resid_post")
    with pytest.raises(ConfigError, match=r"\[1\]"):
        _source(folder, layers=[0, 1])
    with pytest.raises(ConfigError, match="fewer than"):
        _source(folder, dp_rank=0, dp_degree=5)
    with pytest.raises(ConfigError, match="already holds"):
        write_activation_cache(_cfg(), folder, rows=10, shard_rows=5)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    main(
        [
            "--out",
            str(out),
            "--rows",
            "32",
            "--shard-rows",
            "16",
            "--dtype",
            "bfloat16",
            f"--data.model_path={ASSETS / 'tiny_gpt2'}",
            f"--data.dataset={ASSETS / 'tiny_text.txt'}",
            "--data.seq_len=9",
            "--data.layers=[1]",
        ]
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_shards"] == 2 and meta["dtype"] == "bfloat16"
    assert load_file(str(shard_path(out, 1)))["x"].dtype == torch.bfloat16
