"""Activation cache: files equal an independent hook computation; the cache source equals the stream.

Also: seeded block order (every block once per epoch, over ranks), exact resume, meta checks,
disk-space refusal, a writer interrupted and resumed, the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtitan_clt.config import JobConfig
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data import SourceContext, cache_writer, load_llm, write_activation_cache
from torchtitan_clt.data.cache import CacheBlocks, block_location, read_meta, shard_path
from torchtitan_clt.data.cache_writer import main
from torchtitan_clt.data.pipeline import LLMHandle
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader
from torchtitan_clt.protocols import data_source_registry

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LAYERS = [0, 2, 3]


def _cfg(**data) -> JobConfig:
    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), str(ASSETS / "tiny_text.txt")
    d.seq_len, d.llm_batch_size, d.layers = 9, 2, list(LAYERS)  # a block is 2 × 8 = 16 rows
    d.buffer_tokens, d.buffer_passes = 40, 2
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


@pytest.fixture(scope="module")
def llm():
    return load_llm(str(ASSETS / "tiny_llama"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, llm):
    """Two writer ranks (as torchrun would run them), fp32, 2 blocks per shard."""
    folder = tmp_path_factory.mktemp("cache") / "c"
    assert (
        write_activation_cache(_cfg(), folder, 200, 32, "float32", rank=1, world=2, llm=LLMHandle(*llm))
        is None
    )
    meta = write_activation_cache(_cfg(), folder, 200, 32, "float32", rank=0, world=2, llm=LLMHandle(*llm))
    return folder, meta


def _source(name, folder=None, **kw):
    ctx = {k: kw.pop(k) for k in ("dp_rank", "dp_degree", "seed") if k in kw}
    cfg = _cfg(source=name, cache_dir=str(folder or ""), **kw)
    return data_source_registry.get(name)(cfg, SourceContext(**ctx))


def _reference(llm, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """resid_mid / mlp_out of LAYERS from a full forward with hand-made hooks, float64 compare."""
    model, store, handles = llm[0], {}, []
    for layer in LAYERS:
        block = model.model.layers[layer]
        handles.append(
            block.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, layer=layer: store.__setitem__(("in", layer), a[0])
            )
        )
        handles.append(
            block.mlp.register_forward_hook(lambda m, a, o, layer=layer: store.__setitem__(("out", layer), o))
        )
    with torch.no_grad():
        model(input_ids=tokens)
    for h in handles:
        h.remove()
    x = torch.stack([store[("in", layer)] for layer in LAYERS], 2)[:, 1:]  # [B, T-1, L, d]
    y = torch.stack([store[("out", layer)] for layer in LAYERS], 2)[:, 1:]
    return x.reshape(-1, len(LAYERS), 64).double(), y.reshape(-1, len(LAYERS), 64).double()


def test_meta_and_files_match_independent_hooks(cache, llm):
    folder, meta = cache
    assert json.loads((folder / "meta.json").read_text()) == meta
    # 200 rows -> 13 blocks of 16 -> 7 per rank; shards of 2 blocks: 4 per rank, interleaved.
    assert (meta["n_blocks"], meta["rows"], meta["n_shards"], meta["ranks"]) == (14, 224, 8, 2)
    assert meta["layers"] == LAYERS and meta["d_model"] == 64 and meta["llm_n_layers"] == 4
    assert "BOS" in meta["excluded"] and meta["tokens"] == 14 * 2 * 9
    assert not list(folder.glob("progress_*")) and not list(folder.glob(".tmp*"))
    for rank in range(2):  # rank r's shards r, r+2, ... hold its text share in reading order
        x = torch.cat([load_file(str(shard_path(folder, j * 2 + rank)))["x"] for j in range(4)])
        y = torch.cat([load_file(str(shard_path(folder, j * 2 + rank)))["y"] for j in range(4)])
        assert x.shape == (7 * 16, 3, 64) and x.dtype == torch.float32
        loader = build_token_loader(TextSpec(str(ASSETS / "tiny_text.txt")), llm[1], 9, 2, rank, 2)
        refs = [_reference(llm, t) for _, t in zip(range(7), loader)]
        torch.testing.assert_close(x.double(), torch.cat([r[0] for r in refs]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), torch.cat([r[1] for r in refs]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_cache_gives_the_stream_batches(cache, rank):
    """Written order + same seed: the cache source serves exactly the stream source's batches."""
    folder, _ = cache
    kw = dict(dp_rank=rank, dp_degree=2, seed=3, buffer_tokens=20)
    stream = _source("stream", prefetch=False, **kw)
    cached = _source("cache", folder, cache_shuffle=False, prefetch=True, **kw)
    for i in range(9):  # 3 refills of 2 blocks (32 rows), 2 passes each, of the rank's 7 blocks
        (sx, sy), (cx, cy) = stream.next_batch(20), cached.next_batch(20)
        assert torch.equal(sx, cx) and torch.equal(sy, cy), i
    stream.close()
    cached.close()


def test_seeded_block_order_every_block_once_per_epoch(cache):
    folder, _ = cache
    meta = read_meta(folder)
    order = {}
    for seed in (0, 1):
        for epoch in range(2):
            got = []
            for rank in range(3):
                blocks = CacheBlocks(folder, meta, LAYERS, rank, 3, seed)
                n = blocks.per_epoch
                got += [blocks.block_at(k) for k in range(epoch * n, (epoch + 1) * n)]
            assert sorted(got) == list(range(14)), (seed, epoch)  # every block once, over the ranks
            order[seed, epoch] = got
    assert order[0, 0] != order[0, 1] and order[0, 0] != order[1, 0]  # reshuffled per epoch and seed
    written = CacheBlocks(folder, meta, LAYERS, 1, 3, shuffle=False)
    assert [written.block_at(k) for k in range(6)] == [1, 4, 7, 10, 13, 1]
    # Block 5 is local block 2 of writer 1: its shard 1 (file 3), first row.
    x, _ = CacheBlocks(folder, meta, [0, 1, 2]).read(5)
    assert torch.equal(x, load_file(str(shard_path(folder, 3)))["x"][:16])


@pytest.mark.parametrize("stop,workers", [(0, 0), (4, 0), (7, 2)])
def test_cache_source_resume_exact(cache, stop, workers):
    folder, _ = cache
    ref = _source("cache", folder, seed=4, layers=[2, 3], num_workers=workers)
    want = [ref.next_batch(30) for _ in range(stop + 8)]
    a = _source("cache", folder, seed=4, layers=[2, 3], num_workers=workers)
    for _ in range(stop):
        a.next_batch(30)
    b = _source("cache", folder, seed=4, layers=[2, 3], num_workers=workers)
    b.load_state_dict(a.state_dict())
    for (wx, wy), (gx, gy) in zip(want[stop:], [b.next_batch(30) for _ in range(8)]):
        assert wx.shape == (30, 2, 64) and torch.equal(wx, gx) and torch.equal(wy, gy)
    for s in (ref, a, b):
        s.close()


def test_cache_source_attributes_and_layer_subset(cache):
    folder, _ = cache
    src = _source("cache", folder, layers=[2, 3], cache_shuffle=False, buffer_tokens=16, buffer_passes=1)
    assert (src.n_layers, src.layers, src.d_in, src.llm_n_layers) == (2, [2, 3], 64, 4)
    x, _ = src.next_batch(16)  # one refill = block 0 = rank 0's first block, columns of layers 2, 3
    block = load_file(str(shard_path(folder, 0)))["x"][:16, 1:]
    assert sorted(map(tuple, x.flatten(1).tolist())) == sorted(map(tuple, block.flatten(1).tolist()))
    src.close()


def _blocks_of(folder, x):
    """The cached blocks (global ids) whose rows x holds; x must be exactly those blocks' rows, each
    once (as a multiset: contexts with the same first tokens share their first rows)."""
    flat, ids, found = x.flatten(1), set(), []
    for g in range(14):
        shard, start = block_location(read_meta(folder), g)
        rows = load_file(str(shard_path(folder, shard)))["x"][start : start + 16].flatten(1)
        if (flat[:, None] == rows[None]).all(-1).any(0).all():
            ids.add(g)
            found.append(rows)
    assert sorted(map(tuple, flat.tolist())) == sorted(map(tuple, torch.cat(found).tolist()))
    return ids


def test_resume_on_fewer_ranks_serves_each_block_once(cache):
    folder, _ = cache
    kw = dict(cache_shuffle=False, buffer_tokens=32, buffer_passes=1)  # a refill = 2 blocks = a batch
    old = [_source("cache", folder, dp_rank=r, dp_degree=2, **kw) for r in range(2)]
    assert _blocks_of(folder, old[0].next_batch(32)[0]) == {0, 2}
    assert _blocks_of(folder, old[0].next_batch(32)[0]) == {4, 6}  # rank 0 drains blocks 4, 6
    assert _blocks_of(folder, old[1].next_batch(32)[0]) == {1, 3}
    half = old[1].next_batch(16)[0]  # half of rank 1's refill of blocks 5, 7
    sds = [s.state_dict() for s in old]
    new = _source("cache", folder, **kw)
    new.load_state_dict_from_ranks(sds)
    # First the 16 rows rank 1 still owed; then shards 0 and 1 (even, odd positions) alternately,
    # each from where its old rank's refill ended.
    assert _blocks_of(folder, torch.cat([half, new.next_batch(16)[0]])) == {5, 7}
    assert _blocks_of(folder, new.next_batch(32)[0]) == {8, 9}
    assert _blocks_of(folder, new.next_batch(32)[0]) == {10, 11}
    with pytest.raises(ConfigError, match="data.text_shards"):
        _source("cache", folder, dp_rank=0, dp_degree=4, **kw).load_state_dict_from_ranks(sds)
    for s in (*old, new):
        s.close()


def test_resume_on_more_ranks_seeded_order_each_block_once(cache):
    # 4 shards of the seeded order; 2 ranks -> 3 ranks, saved 24 rows into each old rank's first
    # refill (prefetch on: the next refill was being read, and is read again by its new owner).
    folder, _ = cache
    kw = dict(buffer_tokens=32, buffer_passes=1, text_shards=4, seed=5)
    old = [_source("cache", folder, dp_rank=r, dp_degree=2, **kw) for r in range(2)]
    served = [s.next_batch(24)[0] for s in old]
    sds = [s.state_dict() for s in old]
    new = [_source("cache", folder, dp_rank=r, dp_degree=3, **kw) for r in range(3)]
    for s in new:
        s.load_state_dict_from_ranks(sds)
    served += [new[r].next_batch(40 if r < 2 else 32)[0] for r in range(3)]  # owed 8 + a refill
    got = _blocks_of(folder, torch.cat(served))
    # Shards 0, 1 (new rank 0) and 2, 3 (ranks 1, 2) are each a prefix of their blocks in epoch 0.
    order = [CacheBlocks(folder, read_meta(folder), LAYERS, s, 4, seed=5) for s in range(4)]
    want = {order[s].block_at(k) for s, n in zip(range(4), (2, 2, 3, 3)) for k in range(n)}
    assert got == want and len(got) == 10
    for s in (*old, *new):
        s.close()


def test_meta_mismatch_errors(cache, tmp_path):
    folder, _ = cache
    with pytest.raises(ConfigError, match="meta.json"):
        _source("cache", tmp_path / "nothing")
    with pytest.raises(ConfigError, match="model_path"):
        _source("cache", folder, model_path=str(ASSETS / "tiny_gpt2"))
    with pytest.raises(ConfigError, match="hook_out"):
        _source("cache", folder, hook_out="resid_post")
    with pytest.raises(ConfigError, match=r"layers \[1\]"):
        _source("cache", folder, layers=[0, 1])
    with pytest.raises(ConfigError, match="fewer than"):
        _source("cache", folder, dp_rank=0, dp_degree=15)
    broken = tmp_path / "broken"
    broken.mkdir()
    for shard in folder.glob("shard_*"):
        (broken / shard.name).symlink_to(shard)
    (broken / "meta.json").write_text(json.dumps({**read_meta(folder), "n_shards": 9}))
    with pytest.raises(ConfigError, match="shard_00008"):
        _source("cache", broken)
    (broken / "meta.json").write_text(json.dumps({**read_meta(folder), "format": 1}))
    with pytest.raises(ConfigError, match="format 1"):
        _source("cache", broken)
    with pytest.raises(ConfigError, match="other settings"):
        write_activation_cache(_cfg(), folder, rows=10, shard_rows=5)


def test_disk_space_refusal(tmp_path, monkeypatch, llm):
    monkeypatch.setattr(cache_writer.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
    with pytest.raises(ConfigError, match="GiB are free"):
        write_activation_cache(_cfg(), tmp_path / "c", 1000, llm=LLMHandle(*llm))
    assert not list((tmp_path / "c").iterdir())  # refused before writing anything


def test_interrupted_writer_resumes_to_the_same_cache(cache, tmp_path, monkeypatch, llm):
    ref_folder, ref_meta = cache
    calls, real = [], cache_writer.save_file

    def crash_on_third(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    folder = tmp_path / "c"
    args = (_cfg(), folder, 200, 32, "float32")
    monkeypatch.setattr(cache_writer, "save_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(*args, rank=0, world=2, llm=LLMHandle(*llm))
    assert torch.load(folder / "progress_rank00000.pt", weights_only=True)["blocks"] == 4
    assert not (folder / "meta.json").exists()
    monkeypatch.setattr(cache_writer, "save_file", real)
    assert write_activation_cache(*args, rank=0, world=2, llm=LLMHandle(*llm)) is None  # rank 1 missing
    meta = write_activation_cache(*args, rank=1, world=2, llm=LLMHandle(*llm))
    assert meta == ref_meta
    for i in range(meta["n_shards"]):
        want, got = load_file(str(shard_path(ref_folder, i))), load_file(str(shard_path(folder, i)))
        assert torch.equal(want["x"], got["x"]) and torch.equal(want["y"], got["y"])
    assert write_activation_cache(*args, rank=0, world=2, llm=LLMHandle(*llm)) == meta  # done: no-op


def test_cli_tokens_and_bf16(tmp_path, capsys, llm):
    out = tmp_path / "cli"
    main(
        [
            "--out",
            str(out),
            "--tokens",
            "40",  # 5 contexts -> 5 × 8 = 40 rows -> 3 blocks of 16
            "--dtype",
            "bfloat16",
            f"--data.model_path={ASSETS / 'tiny_llama'}",
            f"--data.dataset={ASSETS / 'tiny_text.txt'}",
            "--data.seq_len=9",
            "--data.llm_batch_size=2",
            "--data.layers=[0,2,3]",
        ]
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_blocks"] == 3 and meta["dtype"] == "bfloat16" and "cache_dir" in capsys.readouterr().out
    x = load_file(str(shard_path(out, 0)))["x"]
    assert x.dtype == torch.bfloat16 and x.shape == (48, 3, 64)
    loader = build_token_loader(TextSpec(str(ASSETS / "tiny_text.txt")), llm[1], 9, 2)
    want = torch.cat([_reference(llm, t)[0] for _, t in zip(range(3), loader)])
    torch.testing.assert_close(x.float(), want.float().to(torch.bfloat16).float())
