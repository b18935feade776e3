"""Activation cache on disk: write once from the LLM, train many times without it (``cache`` source).

Folder layout: ``meta.json`` (model, hook points, layers, d_model, dtype, rows, what was excluded)
and shards ``shard_NNNNN.safetensors`` holding ``x`` and ``y`` of shape ``[rows, L, d]``. All shards
have the same number of rows (the tail that would not fill one is not written), so a shuffle-buffer
refill is a whole number of shards.

The ``cache`` source reads this rank's shards (shard ``i`` goes to rank ``i % dp_degree``) in a
seeded order per epoch, through the same full-refill shuffle buffer as the stream source, so resume
is exact here too. ``data.layers`` may pick a subset of the cached layers.

    python -m torchtitan_clt.data.cache --config train_configs/X.toml --out DIR --rows 1000000
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.buffer import ShuffleBuffer
from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.hooks import check_layers, d_model
from torchtitan_clt.data.llm import load_llm, model_name
from torchtitan_clt.data.source import ActivationSource, SourceContext, text_spec
from torchtitan_clt.data.text import HELD_OUT_EVERY
from torchtitan_clt.data.tokenize import build_token_loader

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard_{index:05d}.safetensors"


def write_activation_cache(
    job_config: Any,
    folder: str | Path,
    rows: int,
    shard_rows: int = 16_384,
    dtype: str = "bfloat16",
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Extract ``rows`` activation rows (BOS excluded) of ``data``'s model and text into ``folder``.

    The text is the training stream of ``data.dataset`` (held-out documents excluded). Returns the
    meta written to ``meta.json`` (last, so a folder without it is an unfinished cache).
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"cache dtype {dtype!r}: choose one of {', '.join(_DTYPES)}.")
    d = job_config.data
    folder = Path(folder)
    if (folder / META_FILE).exists():
        raise ConfigError(f"{folder} already holds an activation cache; pick another folder or delete it.")
    folder.mkdir(parents=True, exist_ok=True)
    llm, tokenizer = load_llm(d.model_path, d.model_dtype, device)
    layers = check_layers(llm, list(d.layers))
    extractor = ActivationExtractor(llm, d.hook_in, d.hook_out, layers, dtype=_DTYPES[dtype])
    loader = build_token_loader(text_spec(job_config), tokenizer, d.seq_len, d.llm_batch_size)
    n_shards = max(1, rows // shard_rows)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    pending = written = 0
    t0 = time.perf_counter()
    it = iter(loader)
    while written < n_shards:
        x, y = extractor(next(it))
        xs.append(x.cpu())
        ys.append(y.cpu())
        pending += x.shape[0]
        while pending >= shard_rows and written < n_shards:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            tmp = folder / f".tmp_{written:05d}.safetensors"
            save_file({"x": x_all[:shard_rows].contiguous(), "y": y_all[:shard_rows].contiguous()}, str(tmp))
            os.replace(tmp, shard_path(folder, written))
            written += 1
            xs, ys = [x_all[shard_rows:]], [y_all[shard_rows:]]
            pending -= shard_rows
            rate = written * shard_rows / (time.perf_counter() - t0)
            logger.info("cache: shard %d / %d written (%.0f rows/s)", written, n_shards, rate)
    meta = {
        "model": model_name(d.model_path),
        "model_path": d.model_path,
        "hook_in": d.hook_in,
        "hook_out": d.hook_out,
        "layers": layers,
        "d_model": d_model(llm),
        "dtype": dtype,
        "rows": n_shards * shard_rows,
        "shard_rows": shard_rows,
        "n_shards": n_shards,
        "dataset": d.dataset,
        "seq_len": d.seq_len,
        "excluded": f"position 0 (BOS) of every context; documents i % {HELD_OUT_EVERY} == "
        f"{HELD_OUT_EVERY - 1} (held out for evaluation)",
    }
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_FILE)
    return meta


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ConfigError(
            f"data.cache_dir = {str(folder)!r} holds no {META_FILE}: write a cache first with "
            "`python -m torchtitan_clt.data.cache --config ... --out DIR` (an unfinished cache has no meta)."
        )
    return json.loads(path.read_text())


class ShardOrder:
    """This rank's shards in a seeded order, reshuffled every epoch (``Stateful``)."""

    def __init__(self, shards: list[int], seed: int):
        self.shards, self.seed = shards, seed
        self.epoch = self.pos = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        while True:
            order = self._order()
            while self.pos < len(order):
                self.pos += 1
                yield order[self.pos - 1]
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])


class CacheSource(ActivationSource):
    def __init__(self, job_config: Any, ctx: SourceContext):
        d = job_config.data
        self.folder = Path(d.cache_dir)
        meta = read_meta(self.folder)
        for point in ("hook_in", "hook_out"):
            if getattr(d, point) != meta[point]:
                raise ConfigError(
                    f"data.{point} = {getattr(d, point)!r} but the cache in {self.folder} holds "
                    f"{meta[point]!r}: set data.{point} = {meta[point]!r} or write another cache."
                )
        cached = list(meta["layers"])
        want = list(d.layers) or cached
        missing = [layer for layer in want if layer not in cached]
        if missing:
            raise ConfigError(
                f"data.layers = {want}: layers {missing} are not in the cache (it has {cached})."
            )
        self.columns = [cached.index(layer) for layer in want]
        self.layers, self.n_layers = want, len(want)
        self.d_in = self.d_out = int(meta["d_model"])
        self.hook_in, self.hook_out = meta["hook_in"], meta["hook_out"]
        self.model_name = meta["model"]
        self.device = torch.device(ctx.device)
        shards = [i for i in range(int(meta["n_shards"])) if i % ctx.dp_degree == ctx.dp_rank]
        if int(meta["n_shards"]) < ctx.dp_degree:  # checked on every rank, so all stop together
            raise ConfigError(
                f"The cache in {self.folder} has {meta['n_shards']} shards, fewer than the "
                f"{ctx.dp_degree} data-parallel ranks: write more (or smaller) shards."
            )
        self.order = ShardOrder(shards, ctx.seed)
        buffer_device = self.device if d.buffer_device == "auto" else torch.device(d.buffer_device)
        self.buffer = ShuffleBuffer(
            self.order, self._load, d.buffer_tokens, d.buffer_passes, buffer_device, ctx.seed
        )

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = load_file(str(shard_path(self.folder, index)))
        cols = torch.tensor(self.columns)
        return t["x"][:, cols], t["y"][:, cols]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.buffer.next_batch(batch_size)
        return x.to(self.device, torch.float32), y.to(self.device, torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "describe": self.describe()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_describe(sd.get("describe"))
        self.buffer.load_state_dict(sd["buffer"])

    def close(self) -> None:
        self.buffer.x = self.buffer.y = None


def build_cache_source(job_config: Any, ctx: SourceContext) -> ActivationSource:
    return CacheSource(job_config, ctx)


def main(argv: list[str] | None = None) -> None:
    """``python -m torchtitan_clt.data.cache --config FILE --out DIR --rows N [--section.field=v ...]``."""
    import argparse

    from torchtitan_clt.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="cache folder to create")
    ap.add_argument("--rows", type=int, required=True, help="activation rows (tokens) to write")
    ap.add_argument("--shard-rows", type=int, default=16_384)
    ap.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(rest)
        meta = write_activation_cache(cfg, args.out, args.rows, args.shard_rows, args.dtype, args.device)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
