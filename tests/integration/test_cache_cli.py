"""Activation cache end to end: torchrun writes it on 2 ranks; the trainer from the cache = from the stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from torchtitan_clt.config import load_config
from torchtitan_clt.data import load_llm, write_activation_cache
from torchtitan_clt.data.cache import shard_path
from torchtitan_clt.data.pipeline import LLMHandle
from torchtitan_clt.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "train_configs" / "debug_model.toml")


def test_torchrun_two_ranks_write_what_each_rank_would(tmp_path):
    out = tmp_path / "tr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "scripts" / "cache_activations.py"), "--config", DEBUG, "--out", str(out),
        "--rows", "1200", "--shard-rows", "500", "--dtype", "float32",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    # 1200 rows -> 5 blocks of 8 × 31 = 248 rows -> 3 per rank; 2 blocks per shard.
    assert (meta["ranks"], meta["n_blocks"], meta["n_shards"], meta["block_rows"]) == (2, 6, 4, 248)
    assert "tokens/s" in r.stderr + r.stdout and "GiB" in r.stderr + r.stdout
    ref = tmp_path / "ref"  # the same ranks, one after the other, in this process
    cfg = load_config(["--config", DEBUG])
    llm, tok = load_llm(cfg.data.model_path)
    for rank in (1, 0):
        write_activation_cache(cfg, ref, 1200, 500, "float32", rank=rank, world=2, llm=LLMHandle(llm, tok))
    for i in range(4):
        a, b = load_file(str(shard_path(out, i))), load_file(str(shard_path(ref, i)))
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_from_cache_equals_training_from_stream(tmp_path):
    common = ["--config", DEBUG, f"--job.dump_folder={tmp_path}", "--training.steps=8", "--metrics.log_freq=1",
              "--checkpoint.enable=false", "--eval.every=0", "--eval.enable=false"]  # fmt: skip
    cfg = load_config(common)
    rows = 8 * cfg.training.batch_size + cfg.standardize.estimate_tokens + 2 * cfg.data.buffer_tokens
    write_activation_cache(cfg, tmp_path / "cache", rows, 1024, "float32")
    assert train_main([*common, "--job.name=stream", "--data.prefetch=false"]) == 0
    assert train_main([*common, "--job.name=cache", "--data.source=cache", f"--data.cache_dir={tmp_path / 'cache'}",
                       "--data.cache_shuffle=false"]) == 0  # fmt: skip
    stream, cache = _metrics(tmp_path / "stream"), _metrics(tmp_path / "cache")
    assert len(stream) == len(cache) == 8
    for s, c in zip(stream, cache):  # same batches -> the same training, bit for bit
        assert s["loss"] == c["loss"] and s["fvu_per_layer"] == c["fvu_per_layer"], (
            s["step"],
            s["loss"],
            c["loss"],
        )
    assert 0.0 <= cache[-1]["data_wait_frac"] <= 1.0
