"""The ``cache`` source: activations read back from a cache on disk instead of an LLM forward.

Folder layout (written by ``scripts/cache_activations.py``, see ``cache_writer.py``): ``meta.json``
(model, hook points, layers, d_model, dtype, rows, tokens, what was excluded) and shards
``shard_NNNNN.safetensors`` holding ``x`` and ``y`` of shape ``[rows, L, d]``.

The unit of reading is a *block*: the rows of one LLM batch (``llm_batch_size`` contexts, BOS
dropped), stored in extraction order. Writer rank ``w`` of ``W`` writes its local blocks
``0, 1, ...`` into its shards ``w, w + W, w + 2W, ...``; the global block ``g`` is local block
``g // W`` of writer ``g % W``. Each epoch, the blocks are put in a seeded order (or the written
order with ``data.cache_shuffle = false``) and dealt round-robin over ``data.text_shards`` virtual
shards (default: the data-parallel ranks of the first run, then fixed); each data-parallel rank
reads a block of shards round-robin, so every block is read exactly once per epoch. Under tensor
parallelism the blocks of a data-parallel rank's sequence are dealt over its TP ranks: TP rank
``j`` of ``tp`` reads positions ``j, j + tp, ...`` (its *lane*), and the buffer broadcasts each block
from the rank that read it (``ShuffleBuffer``, ``ChunkShare``), so a block is read once per group.
``StatefulDataLoader`` workers read the blocks from memory-mapped shards (``safe_open``) ahead of
time, and the same full-refill shuffle buffer as the stream source mixes them: with the written
order, a run from the cache sees exactly the batches a stream run on the same text would see, and
resume is exact either way. Resume on another number of ranks is exact too, as for the stream
source: every shard keeps its position, and the new ranks first finish the old ranks' in-flight
buffer refills (``ShuffleBuffer.adopt``), which they read back by position in the sequence.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.buffer import ShuffleBuffer, on_gpu
from torchtitan_clt.data.cache_layout import FORMAT, META_FILE, shard_path
from torchtitan_clt.data.llm import model_name
from torchtitan_clt.data.source import (
    ActivationSource,
    BufferedSource,
    SourceContext,
    _tp_info,
    buffer_log,
    chunk_share,
)
from torchtitan_clt.data.tokenize import reader_shards
from torchtitan_clt.tools.dtypes import DTYPES

logger = logging.getLogger(__name__)

_OPEN_FILES = 64  # memory-mapped shards kept open per reader


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise ConfigError(
            f"data.cache_dir = {str(folder)!r} holds no {META_FILE}: write a cache first with "
            "`python scripts/cache_activations.py --config ... --out DIR` (an unfinished cache has no "
            "meta; rerun the same command to finish it)."
        )
    return json.loads(path.read_text())


def block_location(meta: dict[str, Any], block: int) -> tuple[int, int]:
    """(shard index, first row) of global block ``block``."""
    ranks, per_shard, rows = int(meta["ranks"]), int(meta["shard_blocks"]), int(meta["block_rows"])
    writer, local = block % ranks, block // ranks
    return (local // per_shard) * ranks + writer, (local % per_shard) * rows


def check_meta(job_config: Any, meta: dict[str, Any], folder: Path) -> list[int]:
    """Stop with a ``ConfigError`` unless the cache holds what ``data`` asks for; the layers to read."""
    d = job_config.data
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"The cache in {folder} has format {meta.get('format', 1)}, this version reads format {FORMAT}: "
            "write it again with scripts/cache_activations.py."
        )
    missing = [
        shard_path(folder, i).name
        for i in range(int(meta["n_shards"]))
        if not shard_path(folder, i).is_file()
    ]
    if missing:
        raise ConfigError(f"The cache in {folder} lacks {missing[:5]}: it is damaged; write it again.")
    want_model = model_name(d.model_path)
    if want_model != meta["model"]:
        raise ConfigError(
            f"data.model_path = {d.model_path!r} ({want_model}) but the cache in {folder} was written "
            f"from {meta['model_path']!r} ({meta['model']}): set data.model_path = {meta['model_path']!r} "
            "or write another cache."
        )
    for point in ("hook_in", "hook_out"):
        if getattr(d, point) != meta[point]:
            raise ConfigError(
                f"data.{point} = {getattr(d, point)!r} but the cache in {folder} holds "
                f"{meta[point]!r}: set data.{point} = {meta[point]!r} or write another cache."
            )
    cached = list(meta["layers"])
    want = list(d.layers) or cached
    missing = [layer for layer in want if layer not in cached]
    if missing:
        raise ConfigError(
            f"data.layers = {want}: layers {missing} are not in the cache in {folder} (it has {cached})."
        )
    if want != sorted(set(want)):
        raise ConfigError(f"data.layers = {want}: give distinct layers in increasing order.")
    shape = [int(meta["block_rows"]) * int(meta["shard_blocks"]), len(cached), int(meta["d_model"])]
    with safe_open(str(shard_path(folder, 0)), framework="pt") as f:  # the files agree with the meta
        for name in ("x", "y"):
            got = list(f.get_slice(name).get_shape())
            if got[1:] != shape[1:] or got[0] % int(meta["block_rows"]):
                raise ConfigError(
                    f"{shard_path(folder, 0)}: {name} has shape {got}, but meta.json says "
                    f"[k × {meta['block_rows']}, {shape[1]}, {shape[2]}]: the cache is damaged; write it again."
                )
    if d.dataset != meta.get("dataset", d.dataset):
        logger.warning("data.dataset = %r, but the cache was written from %r.", d.dataset, meta["dataset"])
    return [cached.index(layer) for layer in want]


class CacheBlocks(IterableDataset):
    """This rank's cache blocks ``(x, y)``, epoch after epoch, forever (``Stateful``).

    Position ``j`` of each epoch's block order belongs to shard ``j % num_shards``; shard ``s``'s
    ``q``-th block is at position ``s + (q % e) * num_shards`` of epoch ``q // e`` (``e`` its blocks
    per epoch). The rank reads its shards (``reader_shards``) round-robin from ``base`` (shard ->
    ``q`` at the start, and the index of the first shard to read): that is its block sequence,
    indexed by ``k``. DataLoader worker ``w`` of ``m`` yields ``k = w, w + m, ...``, so the loader's
    round-robin over workers serves the sequence in order. The state is the next ``k``. With
    ``lane = (j, tp)`` the loader serves only positions ``j + k * tp`` (``k`` counts those).
    """

    def __init__(
        self,
        folder: Path,
        meta: dict[str, Any],
        columns: list[int],
        dp_rank: int = 0,
        dp_degree: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_shards: int = 0,
        base: dict[str, Any] | None = None,
        lane: tuple[int, int] = (0, 1),
    ):
        self.folder, self.meta, self.lane = Path(folder), meta, lane
        self.n_blocks = int(meta["n_blocks"])
        self.num_shards = num_shards or dp_degree
        if self.n_blocks < self.num_shards:  # checked on every rank, so all stop together
            raise ConfigError(
                f"The cache in {folder} has {self.n_blocks} blocks, fewer than the {self.num_shards} "
                "shards of its order (data-parallel ranks, or data.text_shards): write a larger cache."
            )
        self.columns = None if columns == list(range(len(meta["layers"]))) else columns
        self.dp_rank, self.dp_degree, self.seed, self.shuffle = dp_rank, dp_degree, seed, shuffle
        self.shards = reader_shards(dp_rank, dp_degree, self.num_shards)
        self.base = base or {"q": {s: 0 for s in self.shards}, "next": 0}
        self.per_epoch = sum(self._shard_blocks(s) for s in self.shards)
        self._k: int | None = None
        self._files: dict[int, Any] = {}
        self._perms: dict[int, torch.Tensor] = {}  # a few epochs' orders (shards may be an epoch apart)

    def _shard_blocks(self, shard: int) -> int:
        return len(range(shard, self.n_blocks, self.num_shards))

    def position(self, k: int) -> tuple[int, int]:
        """``(shard, q)`` of position ``k`` of this rank's sequence."""
        c, first = len(self.shards), int(self.base["next"])
        i = (first + k) % c
        return self.shards[i], int(self.base["q"][self.shards[i]]) + len(range((i - first) % c, k, c))

    def positions_at(self, k: int) -> dict[int, int]:
        """Every own shard's ``q`` once the first ``k`` blocks of the sequence are read."""
        c, first = len(self.shards), int(self.base["next"])
        return {
            s: int(self.base["q"][s]) + len(range((i - first) % c, k, c)) for i, s in enumerate(self.shards)
        }

    def block_at(self, k: int) -> int:
        """The global block at position ``k`` of this rank's sequence."""
        shard, q = self.position(k)
        epoch, i = divmod(q, self._shard_blocks(shard))
        j = shard + i * self.num_shards
        if not self.shuffle:
            return j
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n_blocks, generator=g)
        return int(self._perms[epoch][j])

    def read(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [block_rows, L, d], y [block_rows, L, d])`` in the cache's dtype, from the mmap."""
        shard, start = block_location(self.meta, block)
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= _OPEN_FILES:
                self._files.clear()
            f = self._files[shard] = safe_open(str(shard_path(self.folder, shard)), framework="pt")
        stop = start + int(self.meta["block_rows"])
        x, y = f.get_slice("x")[start:stop], f.get_slice("y")[start:stop]
        if self.columns is not None:
            x, y = x[:, self.columns], y[:, self.columns]
        return x, y

    def __iter__(self):
        info = get_worker_info()
        w, m = (info.id, info.num_workers) if info is not None else (0, 1)
        k = self._k if self._k is not None else w
        while True:
            self._k = k + m  # taken after this yield, the state points past the block
            yield self.read(self.block_at(self.lane[0] + k * self.lane[1]))
            k += m

    def state_dict(self) -> dict[str, Any]:
        if self._k is None:  # not started: this worker's first position
            info = get_worker_info()
            return {"k": info.id if info is not None else 0}
        return {"k": self._k}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._k = sd["k"]

    def __getstate__(self) -> dict[str, Any]:  # open files stay behind when workers are spawned
        return {**self.__dict__, "_files": {}}


class CacheSource(BufferedSource):
    def __init__(self, job_config: Any, ctx: SourceContext):
        d = job_config.data
        if not d.cache_dir:
            raise ConfigError(
                "data.source = 'cache' needs data.cache_dir (a folder written by scripts/cache_activations.py)."
            )
        self.folder = Path(d.cache_dir)
        self.meta = meta = read_meta(self.folder)
        columns = check_meta(job_config, meta, self.folder)
        self.layers = [meta["layers"][c] for c in columns]
        self.n_layers = len(self.layers)
        self.d_in = self.d_out = int(meta["d_model"])
        self.hook_in, self.hook_out = meta["hook_in"], meta["hook_out"]
        self.model_name = meta["model"]
        self.llm_n_layers = meta.get("llm_n_layers")
        self.device = torch.device(ctx.device)
        self.columns, self.seed, self.shuffle, self.num_workers = (
            columns,
            ctx.seed,
            d.cache_shuffle,
            d.num_workers,
        )
        self.dp_rank, self.dp_degree = ctx.dp_rank, ctx.dp_degree
        self.lane = _tp_info(ctx.tp_group)  # this TP rank's share of the blocks
        if d.text_shards < 0:
            raise ConfigError(
                f"data.text_shards = {d.text_shards}: give a positive number, or 0 for the default."
            )
        self._asked_shards = d.text_shards
        self._set_shards(d.text_shards or ctx.dp_degree)
        self.blocks, self.loader = self._block_loader(
            ctx.dp_rank, ctx.dp_degree, d.num_workers, None, self.lane
        )
        buffer_device = self.device if d.buffer_device == "auto" else torch.device(d.buffer_device)
        self.buffer = ShuffleBuffer(
            self.loader,
            _as_rows,
            d.buffer_tokens,
            d.buffer_passes,
            buffer_device,
            ctx.seed,
            d.prefetch,
            replay=self._replay,
            share=chunk_share(ctx, self.device),
            pin_memory=on_gpu(self.device),
        )
        row_bytes = self.n_layers * (self.d_in + self.d_out) * DTYPES[meta["dtype"]].itemsize
        logger.info(
            "cache source: %s (%s, %d blocks of %d rows), layers %s, %s -> %s, %s order, %s",
            self.folder,
            self.model_name,
            self.blocks.n_blocks,
            meta["block_rows"],
            self.layers,
            self.hook_in,
            self.hook_out,
            "seeded" if d.cache_shuffle else "written",
            buffer_log(self.buffer, int(meta["block_rows"]), row_bytes),
        )

    def _set_shards(self, shards: int) -> None:
        self.num_shards = self._checked_shards(shards, self.dp_degree, "block order", "data-parallel rank")

    def _block_loader(
        self,
        reader: int,
        readers: int,
        workers: int,
        base: dict[str, Any] | None,
        lane: tuple[int, int] = (0, 1),
    ) -> tuple[CacheBlocks, StatefulDataLoader]:
        blocks = CacheBlocks(
            self.folder,
            self.meta,
            self.columns,
            reader,
            readers,
            self.seed,
            self.shuffle,
            self.num_shards,
            base,
            lane,
        )
        loader = StatefulDataLoader(
            blocks, batch_size=None, num_workers=workers, prefetch_factor=4 if workers > 0 else None
        )
        return blocks, loader

    def _reset_loader(self, base: dict[str, Any] | None) -> None:
        self.blocks, self.loader = self._block_loader(
            self.dp_rank, self.dp_degree, self.num_workers, base, self.lane
        )
        self.buffer.loader = self.loader

    def _replay(self, origin: dict[str, Any], lane: tuple[int, int]) -> tuple[Any, Any]:
        """An old data-parallel rank's refill: the blocks of its sequence from the refill's start
        (``start``, or where its loader state was), of those the ``c``-th with ``c % lane[1] ==
        lane[0]``, read by position (the others are not read)."""
        blocks, _ = self._block_loader(origin["reader"], origin["readers"], 0, origin["base"])
        start = int(origin["start"]) if "start" in origin else min(_ks(origin["loader"]))

        def read():
            for c in itertools.count(lane[0], lane[1]):
                yield blocks.read(blocks.block_at(start + c))

        return read(), _as_rows

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["blocks"] = {
            "shards": self.num_shards,
            "reader": self.dp_rank,
            "readers": self.dp_degree,
            "workers": self.num_workers,
            "base": self.blocks.base,
        }
        if self.lane[1] > 1:
            sd["blocks"]["lane"] = list(self.lane)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_describe(sd.get("describe"))
        if "blocks" in sd:  # else written before shards: one per rank, from the beginning
            lane = tuple(sd["blocks"].get("lane", (0, 1)))
            if lane != self.lane:
                raise ConfigError(
                    f"This rank's cache position was saved by TP rank {lane[0]} of {lane[1]}, but it is "
                    f"TP rank {self.lane[0]} of {self.lane[1]} now: resume on the mesh it was saved on."
                )
            self._set_shards(int(sd["blocks"]["shards"]))
            self._reset_loader(sd["blocks"]["base"])
        self.buffer.load_state_dict(sd["buffer"])

    def load_state_dict_from_ranks(self, sds: list[dict[str, Any]]) -> None:
        """Resume on a different number of ranks from every old rank's state, exactly.

        Every shard of the block order continues where the refill its old rank was draining ended;
        this rank first drains the in-flight refills of the old ranks ``r`` with ``r % new_ranks ==
        this rank`` (tensor-parallel ranks of one data-parallel rank hold the same state).
        """
        for sd in sds:
            self._check_describe(sd.get("describe"))
        if any("blocks" not in sd for sd in sds):
            raise ConfigError(
                f"This checkpoint's cache position was written before block shards existed: resume it on "
                f"the {len(sds)} ranks that saved it, or start fresh."
            )
        self._set_shards(int(sds[0]["blocks"]["shards"]))
        groups: dict[int, list[dict[str, Any]]] = {}  # the TP ranks of each old data-parallel rank
        for sd in sds:
            groups.setdefault(int(sd["blocks"]["reader"]), []).append(sd)
        q: dict[int, int] = {}
        refills = []
        for reader in sorted(groups):
            members = sorted(groups[reader], key=lambda m: m["blocks"].get("lane", (0, 1))[0])
            tp = int(members[0]["blocks"].get("lane", (0, 1))[1])
            if tp > 1 and len(members) != tp:
                raise ConfigError(
                    f"The checkpoint holds {len(members)} of the {tp} cache states of TP group {reader}."
                )
            members = members[:tp]  # saved before lanes: every TP rank held the same state
            sd = members[0]
            blk, buf = sd["blocks"], sd["buffer"]
            old, _ = self._block_loader(reader, int(blk["readers"]), 0, blk["base"])
            if buf["started"] and buf.get("origin") is None:  # its shards go on from the refill's end
                # Blocks are dealt round-robin over the lanes: the group read the first (sum) of its sequence.
                q.update(old.positions_at(sum(min(_ks(m["buffer"]["loader_end"])) for m in members)))
            else:  # nothing read, or an adopted refill being drained: the own shards did not move
                q.update({int(s): int(v) for s, v in blk["base"]["q"].items()})
            if reader % self.dp_degree == self.dp_rank:
                own = {
                    "reader": reader,
                    "readers": int(blk["readers"]),
                    "workers": int(blk["workers"]),
                    "base": blk["base"],
                    "loader": buf.get("loader"),
                }
                if tp > 1 and buf["started"] and buf.get("origin") is None:
                    own["start"] = sum(min(_ks(m["buffer"]["loader"])) for m in members)
                refills += ShuffleBuffer.in_flight(buf, own)
        mine = reader_shards(self.dp_rank, self.dp_degree, self.num_shards)
        self._reset_loader({"q": {s: q.get(s, 0) for s in mine}, "next": 0})
        self.buffer.adopt(refills)
        self._log_adopted(len(sds), self.num_shards, "activation cache")

    def close(self) -> None:
        self.buffer.close()
        self.buffer._it = None


def _ks(obj: Any) -> list[int]:
    """Every ``CacheBlocks`` position inside a loader state (one per DataLoader worker): the
    smallest is the number of blocks the loader has served."""
    if isinstance(obj, dict):
        if set(obj) == {"k"}:
            return [] if obj["k"] is None else [int(obj["k"])]
        return [k for v in obj.values() for k in _ks(v)]
    return []


def _as_rows(block: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return block[0], block[1]


def build_cache_source(job_config: Any, ctx: SourceContext) -> ActivationSource:
    return CacheSource(job_config, ctx)
