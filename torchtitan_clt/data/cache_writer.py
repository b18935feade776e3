"""Write an activation cache: text -> tokens -> LLM forward with hooks -> shards on disk.

    python scripts/cache_activations.py --config FILE [--out DIR] [--rows N | --tokens N] [--section.field=v ...]
    torchrun --nproc_per_node 8 scripts/cache_activations.py --config FILE ...   # one text shard per rank

Each LLM batch (``data.llm_batch_size`` contexts of ``data.seq_len`` tokens, BOS dropped) is one
block of rows, stored in extraction order; ``cache.py`` explains how blocks map to shards and how
the ``cache`` source shuffles them. Every rank writes its own shards from its own share of the text
(the same share the ``stream`` source would read on that rank). A shard is written to a temporary
file and renamed, then ``progress_rankNNNNN.pt`` records the blocks done and the token loader's
position, so an interrupted run continues after its last complete shard when rerun with the same
command. ``meta.json`` is written last: a folder without it is unfinished.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.cache_layout import FORMAT, META_FILE, shard_path
from torchtitan_clt.data.hooks import check_layers, d_model, n_layers
from torchtitan_clt.data.llm import model_name
from torchtitan_clt.data.pipeline import LLMHandle, load_llm_handle, token_loader
from torchtitan_clt.data.text import HELD_OUT_EVERY
from torchtitan_clt.tools.dtypes import DTYPES

logger = logging.getLogger(__name__)


def progress_path(folder: Path, rank: int) -> Path:
    return folder / f"progress_rank{rank:05d}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plan(
    job_config: Any, llm: Any, layers: list[int], rows: int, shard_rows: int, dtype: str, world: int
) -> dict:
    """What the cache holds and how it is laid out (the part of meta.json known before writing)."""
    d = job_config.data
    block_rows = d.llm_batch_size * (d.seq_len - 1)
    blocks = -(-rows // block_rows)
    return {
        "format": FORMAT,
        "model": model_name(d.model_path),
        "model_path": d.model_path,
        "hook_in": d.hook_in,
        "hook_out": d.hook_out,
        "layers": layers,
        "llm_n_layers": n_layers(llm),
        "d_model": d_model(llm),
        "dtype": dtype,
        "dataset": d.dataset,
        "dataset_config": d.dataset_config,
        "dataset_split": d.dataset_split,
        "text_field": d.text_field,
        "seq_len": d.seq_len,
        "llm_batch_size": d.llm_batch_size,
        "block_rows": block_rows,
        "shard_blocks": max(1, round(shard_rows / block_rows)),
        "blocks_per_rank": -(-blocks // world),
        "ranks": world,
    }


def _meta(plan: dict) -> dict:
    n_blocks = plan["ranks"] * plan["blocks_per_rank"]
    shards_per_rank = -(-plan["blocks_per_rank"] // plan["shard_blocks"])
    return {
        **plan,
        "n_blocks": n_blocks,
        "n_shards": plan["ranks"] * shards_per_rank,
        "rows": n_blocks * plan["block_rows"],
        "tokens": n_blocks * plan["llm_batch_size"] * plan["seq_len"],
        "excluded": f"position 0 (BOS) of every context; documents i % {HELD_OUT_EVERY} == "
        f"{HELD_OUT_EVERY - 1} (held out for evaluation)",
        "row_order": "extraction order within a block (one LLM batch of contexts); the cache source "
        "shuffles blocks and rows",
    }


def _check_disk(folder: Path, plan: dict, blocks_left: int) -> None:
    """Log the size; stop before writing anything if the disk cannot hold what is left."""
    itemsize = DTYPES[plan["dtype"]].itemsize
    block_bytes = plan["block_rows"] * len(plan["layers"]) * 2 * plan["d_model"] * itemsize  # x and y
    total = plan["ranks"] * plan["blocks_per_rank"] * block_bytes
    need = plan["ranks"] * blocks_left * block_bytes  # every rank writes into this folder
    free = shutil.disk_usage(folder).free
    logger.info(
        "cache: %d rows × %d layers × d=%d × (x, y) in %s = %.2f GiB in all, %.2f GiB still to write, "
        "%.2f GiB free in %s",
        _meta(plan)["rows"],
        len(plan["layers"]),
        plan["d_model"],
        plan["dtype"],
        total / 2**30,
        need / 2**30,
        free / 2**30,
        folder,
    )
    if need * 1.01 + 2**26 > free:
        raise ConfigError(
            f"The activation cache needs {need / 2**30:.2f} GiB more in {folder} but only "
            f"{free / 2**30:.2f} GiB are free: free some space, pick another --out, write fewer rows "
            "(--rows / --tokens), fewer layers (data.layers) or a smaller --dtype."
        )


def _load_progress(folder: Path, rank: int, plan: dict) -> dict:
    path = progress_path(folder, rank)
    if not path.is_file():
        return {"plan": plan, "blocks": 0, "contexts": 0, "loader": None}
    prog = torch.load(path, weights_only=True)
    if prog["plan"] != plan:
        diff = {k: (prog["plan"].get(k), v) for k, v in plan.items() if prog["plan"].get(k) != v}
        raise ConfigError(
            f"{folder} holds an unfinished cache written with other settings ({diff}, as (then, now)): "
            "rerun with the same settings to finish it, or pick another --out."
        )
    logger.info("cache: rank %d resumes after %d of %d blocks", rank, prog["blocks"], plan["blocks_per_rank"])
    return prog


def _finalize(folder: Path, plan: dict) -> dict | None:
    """Write meta.json once every rank is done; None while some rank is not."""
    for rank in range(plan["ranks"]):
        path = progress_path(folder, rank)
        if not path.is_file() or torch.load(path, weights_only=True)["blocks"] < plan["blocks_per_rank"]:
            return None
    meta = _meta(plan)
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_FILE)
    for rank in range(plan["ranks"]):
        progress_path(folder, rank).unlink()
    return meta


def write_activation_cache(
    job_config: Any,
    folder: str | Path,
    rows: int,
    shard_rows: int = 16_384,
    dtype: str = "bfloat16",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world: int = 1,
    llm: LLMHandle | None = None,
) -> dict[str, Any] | None:
    """Extract at least ``rows`` activation rows of ``data``'s model and text into ``folder``.

    This call writes rank ``rank``'s share (of ``world``). Returns the meta once the cache is
    complete (every rank done; under ``torch.distributed`` rank 0 writes it after a barrier),
    else None. A rerun with the same arguments continues an unfinished cache.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    d = job_config.data
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llm = llm or load_llm_handle(job_config, device)
    layers = check_layers(llm.model, list(d.layers))
    plan = _plan(job_config, llm.model, layers, rows, shard_rows, dtype, world)
    if (folder / META_FILE).exists():
        meta = json.loads((folder / META_FILE).read_text())
        if {k: meta.get(k) for k in plan} != plan:
            raise ConfigError(
                f"{folder} already holds a complete activation cache with other settings; pick another "
                "folder or delete it."
            )
        logger.info("cache: %s is already complete", folder)
        return meta
    prog = _load_progress(folder, rank, plan)
    per_rank, per_shard, block_rows = plan["blocks_per_rank"], plan["shard_blocks"], plan["block_rows"]
    _check_disk(folder, plan, per_rank - prog["blocks"])

    extractor = llm.extractor(d.hook_in, d.hook_out, layers, DTYPES[dtype])
    loader = token_loader(
        job_config, llm.tokenizer, d.llm_batch_size, dp_rank=rank, dp_degree=world, num_workers=d.num_workers
    )
    if prog["loader"] is not None:
        loader.load_state_dict(prog["loader"])
    it = iter(loader)
    t0, start = time.perf_counter(), prog["blocks"]
    while prog["blocks"] < per_rank:
        done = prog["blocks"]
        n = min(per_shard, per_rank - done)
        x = torch.empty((n * block_rows, len(layers), plan["d_model"]), dtype=DTYPES[dtype])  # [rows, L, d]
        y = torch.empty_like(x)
        for b in range(n):
            bx, by = extractor(next(it))  # one block: [llm_batch_size * (seq_len - 1), L, d]
            x[b * block_rows : (b + 1) * block_rows] = bx
            y[b * block_rows : (b + 1) * block_rows] = by
        path = shard_path(folder, (done // per_shard) * world + rank)
        tmp = path.with_name(f".tmp_{path.name}")
        save_file({"x": x, "y": y}, str(tmp), metadata={"first_block": str(done), "rank": str(rank)})
        os.replace(tmp, path)
        prog = {
            "plan": plan,
            "blocks": done + n,
            "contexts": prog["contexts"] + n * d.llm_batch_size,
            "loader": copy.deepcopy(loader.state_dict()),
        }
        _atomic_save(prog, progress_path(folder, rank))
        elapsed = time.perf_counter() - t0
        rate = (prog["blocks"] - start) / elapsed
        logger.info(
            "cache: rank %d: %d / %d rows (%.1f%%), %.0f tokens/s, ETA %.0f s",
            rank,
            prog["blocks"] * block_rows,
            per_rank * block_rows,
            100 * prog["blocks"] / per_rank,
            rate * d.llm_batch_size * d.seq_len,
            (per_rank - prog["blocks"]) / max(rate, 1e-9),
        )
    if dist.is_initialized():
        dist.barrier()
        meta = _finalize(folder, plan) if dist.get_rank() == 0 else None
        dist.barrier()
        return meta if meta is not None else (_meta(plan) if (folder / META_FILE).exists() else None)
    return _finalize(folder, plan)


def default_rows(job_config: Any) -> int:
    """Rows one training run reads: its steps' batches and the standardization estimate."""
    return job_config.training.steps * job_config.training.batch_size + job_config.standardize.estimate_tokens


def main(argv: list[str] | None = None) -> None:
    from torchtitan_clt.config import load_config

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True
    )
    ap.add_argument("--out", default="", help="cache folder (default: data.cache_dir)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--rows", type=int, help="activation rows (tokens trained on, BOS excluded)")
    size.add_argument("--tokens", type=int, help="text tokens to read (contexts × seq_len, BOS included)")
    ap.add_argument(
        "--shard-rows", type=int, default=16_384, help="rows per shard (rounded to whole LLM batches)"
    )
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--device", default="auto", help="auto: the local GPU if any, else cpu")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        cfg = load_config(rest)
        out = args.out or cfg.data.cache_dir
        if not out:
            raise ConfigError("Say where to write the cache: --out DIR (or data.cache_dir).")
        seq = cfg.data.seq_len
        rows = args.rows or (-(-args.tokens // seq) * (seq - 1) if args.tokens else default_rows(cfg))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=24))  # only for the final barrier
        meta = write_activation_cache(cfg, out, rows, args.shard_rows, args.dtype, device, rank, world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # exit codes: torchtitan_clt/tools/exit_codes.py
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if meta is not None and rank == 0:
        print(json.dumps(meta, indent=2))
        print(f"Train from it with --data.source=cache --data.cache_dir={out}")


if __name__ == "__main__":
    main()
