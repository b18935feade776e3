"""Activation sources: what the trainer pulls ``(x, y)`` batches from.

``stream``: text -> tokens -> LLM forward with hooks -> shuffle buffer on the training device.
Builders have the signature ``build(job_config, ctx: SourceContext) -> ActivationSource`` and are
registered by name in ``data_source_registry`` (see ``torchtitan_clt/data/__init__.py``).

Tensor parallelism: every rank of a TP group must train on the same batch, but no context should be
run through the LLM twice. So each TP rank reads its own share of the text (the text is sharded
over ``dp_degree × tp`` readers), and the group's buffer refills are dealt out chunk by chunk: a
chunk (one LLM batch) is read and extracted by one rank, from its own reader, and broadcast by
pieces straight into every rank's buffer (``ShuffleBuffer``, ``ChunkShare``), over a process group
of the data's own so that the prefetch thread can run it. The buffers are then equal on every TP
rank (same rows, same shuffling seed) and hold ``buffer_tokens`` rounded up to one chunk, as
without TP; no rank holds more gathered rows than one piece.

Resume on another number of ranks keeps every context exactly once. The text is split into
``data.text_shards`` virtual shards, fixed for the run, each with its own position (``tokenize.py``);
the readers share them out. Each old rank was partway through a buffer refill: the new data-parallel
rank ``d`` adopts the in-flight refills of the old data-parallel groups ``g`` with ``g % new_dp ==
d``, replays each from its old readers' loader states (the chunks in the order the old group dealt
them, each read from the old reader that extracted it, so a TP group can change size) and serves
its remaining rows, then reads its own shards from where the old refills ended.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.buffer import ChunkShare, ShuffleBuffer, on_gpu
from torchtitan_clt.data.hooks import check_layers, d_model, family, n_layers
from torchtitan_clt.data.llm import model_name
from torchtitan_clt.data.pipeline import LLMHandle, load_llm_handle, token_loader
from torchtitan_clt.data.tokenize import default_num_shards, reader_shards, shard_states

logger = logging.getLogger(__name__)


@dataclass
class SourceContext:
    device: torch.device | str = "cpu"
    """Training device: batches are returned there (the LLM runs there too)."""
    dp_rank: int = 0
    """This rank's index among data-parallel ranks: it reads its own share of the data."""
    dp_degree: int = 1
    """Number of data-parallel ranks."""
    tp_group: Any = None
    """Tensor-parallel process group (ranks that must see the same batches), or None."""
    data_group: Any = None
    """A process group over ``tp_group``'s ranks that only the data uses (its broadcasts may run on
    the prefetch thread). None: the source creates one with ``data_group``, a collective over the
    world (every rank must then build its source at the same time)."""
    seed: int = 0
    """Seed of the shuffling / synthetic data."""


class ActivationSource:
    """Base of every source (``Stateful``): ``next_batch(B) -> (x [B, L, d_in], y [B, L, d_out])``."""

    n_layers: int
    d_in: int
    d_out: int
    layers: list[int]
    model_name: str
    hook_in: str
    hook_out: str
    llm_n_layers: int | None = None
    """The LLM's total layer count (circuit-tracer exports must cover all of them), if known."""
    llm: LLMHandle | None = None
    """The LLM the source reads, shared with the trainer's evaluation; None if it reads none."""

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def deliver_target_columns(self, tp_group: Any = None) -> bool:
        """Under the ``code`` tensor-parallel layout: from the next batch on, y holds only this
        rank's ``d_out / tp`` columns (its rank in ``tp_group``, the model's), and refills move only
        those (``ChunkShare.columns``). False where the source does not (no shared buffer): the
        trainer slices whole rows."""
        buffer = getattr(self, "buffer", None)
        return buffer.deliver_y_columns(tp_group) if buffer is not None else False

    def describe(self) -> dict[str, Any]:
        """What the batches are, saved with the state and in exports."""
        return {
            "model_name": self.model_name,
            "layers": list(self.layers),
            "hook_in": self.hook_in,
            "hook_out": self.hook_out,
            "d_in": self.d_in,
            "d_out": self.d_out,
        }

    def _check_describe(self, saved: dict[str, Any] | None) -> None:
        if saved is not None and saved != self.describe():
            raise ConfigError(
                f"The checkpoint's data ({saved}) differs from this run's ({self.describe()}): resume "
                "with the same data.model_path, data.layers and hook points, or start fresh."
            )


def _tp_info(group: Any) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def data_group(tp_group: Any) -> Any:
    """A new process group over ``tp_group``'s ranks. ``new_group`` must be called by every rank of
    the world for every group, in the same order: each rank's TP ranks are gathered first."""
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, dist.get_process_group_ranks(tp_group))
    groups = sorted({tuple(sorted(r)) for r in every})
    mine, _ = dist.new_subgroups_by_enumeration([list(g) for g in groups])
    return mine


def chunk_share(ctx: SourceContext, device: torch.device) -> ChunkShare | None:
    """How the TP group shares its buffer refills (None without TP)."""
    if _tp_info(ctx.tp_group)[1] == 1:
        return None
    return ChunkShare(ctx.data_group if ctx.data_group is not None else data_group(ctx.tp_group), device)


def buffer_log(buffer: ShuffleBuffer, chunk_rows: int, row_bytes: int) -> str:
    """What a buffer really holds: rows allocated per slot, GiB in all, slots, where, pinned."""
    rows, slots = buffer.capacity(chunk_rows), 2 if buffer.prefetch else 1
    share = buffer.share
    dealt = (
        f", refills dealt by chunk over {share.size} TP ranks (broadcast by pieces of "
        f"≤ {share.piece_bytes / 2**20:.0f} MiB)"
        if share is not None
        else ""
    )
    return (
        f"buffer {rows} rows × {slots} slot{'s' if slots > 1 else ''} ({rows * row_bytes * slots / 2**30:.2f} "
        f"GiB on {buffer.device}{', pinned' if buffer.pin_memory else ''}; {buffer.buffer_tokens} asked, "
        f"chunks of {chunk_rows}){dealt}, prefetch {'on' if buffer.prefetch else 'off'}"
    )


class BufferedSource(ActivationSource):
    """A source whose rows come out of a ``ShuffleBuffer`` (``self.buffer``): batching and state."""

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.buffer.next_batch(batch_size, self.device)
        return x.to(self.device, torch.float32), y.to(self.device, torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "describe": self.describe()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_describe(sd.get("describe"))
        self.buffer.load_state_dict(sd["buffer"])

    def _checked_shards(self, shards: int, readers: int, what: str, unit: str, note: str = "") -> int:
        """``shards``, the run's shard count (the checkpoint's, or the default), if ``data.text_shards``
        as asked (``self._asked_shards``; 0: any) agrees and this run's ``readers`` can share them."""
        asked = self._asked_shards
        if asked and shards != asked:
            raise ConfigError(
                f"data.text_shards = {asked}, but the checkpoint's {what} is split into {shards} shards "
                f"(fixed for a run): set data.text_shards = {shards} (or 0) to resume it."
            )
        if shards < readers:
            raise ConfigError(
                f"The {what} is split into {shards} shards (data.text_shards), fewer than this run's "
                f"{readers} {unit}s{note}: run on at most {shards} {unit}s, or start a run with "
                f"data.text_shards set to a multiple of every {unit} count you may resume on."
            )
        return shards

    def _log_adopted(self, saved_ranks: int, shards: int, what: str) -> None:
        refills, rows = self.buffer.pending()
        logger.info(
            "Resuming the %s from %d saved ranks: %d shards, %d of the old buffer refills finished here "
            "first (%d rows).",
            what,
            saved_ranks,
            shards,
            refills,
            rows,
        )


class StreamSource(BufferedSource):
    """Activations read live from an LLM forward over this rank's share of the text."""

    def __init__(self, job_config: Any, ctx: SourceContext, llm: LLMHandle | None = None):
        d = job_config.data
        self.device = torch.device(ctx.device)
        self.llm = llm = llm or load_llm_handle(job_config, self.device)
        family(llm.model)  # unsupported architectures stop here, with the supported list
        self.layers = check_layers(llm.model, list(d.layers))
        self.n_layers = len(self.layers)
        self.llm_n_layers = n_layers(llm.model)
        self.d_in = self.d_out = d_model(llm.model)
        self.hook_in, self.hook_out = d.hook_in, d.hook_out
        self.model_name = model_name(d.model_path)

        self.tp_rank, self.tp_size = _tp_info(ctx.tp_group)
        self.tp_group = ctx.tp_group
        self.dp_rank, self.dp_degree = ctx.dp_rank, ctx.dp_degree
        self.reader, self.readers = ctx.dp_rank * self.tp_size + self.tp_rank, ctx.dp_degree * self.tp_size
        self.job_config, self.num_workers = job_config, d.num_workers
        if d.text_shards < 0:
            raise ConfigError(
                f"data.text_shards = {d.text_shards}: give a positive number, or 0 for the default."
            )
        self._asked_shards = d.text_shards
        self._set_text_shards(d.text_shards or default_num_shards(self.readers, d.num_workers))
        self._start: dict[int, dict[str, Any]] = {}  # where own shards begin (resume on other ranks)
        self.loader = self._token_loader(self.reader, self.readers, self.num_workers)
        llm_dtype = next(llm.model.parameters()).dtype
        self.extractor = llm.extractor(d.hook_in, d.hook_out, self.layers, llm_dtype)
        buffer_device = self.device if d.buffer_device == "auto" else torch.device(d.buffer_device)
        self.buffer = ShuffleBuffer(
            self.loader,
            self._extract,
            d.buffer_tokens,
            d.buffer_passes,
            buffer_device,
            ctx.seed,
            d.prefetch,
            llm.lock,  # held while the buffer tokenizes and extracts, possibly on the prefetch thread
            replay=self._replay,
            share=chunk_share(ctx, self.device),
            pin_memory=on_gpu(self.device),
        )
        row_bytes = self.n_layers * (self.d_in + self.d_out) * llm_dtype.itemsize
        logger.info(
            "stream source: %s, layers %s, %s -> %s, %s",
            self.model_name,
            self.layers,
            self.hook_in,
            self.hook_out,
            buffer_log(self.buffer, d.llm_batch_size * (d.seq_len - 1), row_bytes),
        )

    def _extract(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.extractor(tokens)  # [B*(T-1), L, d] each

    # -- text shards and loaders ----------------------------------------------------------------
    def _set_text_shards(self, shards: int) -> None:
        note = " (data-parallel × tensor-parallel ranks)"
        self.text_shards = self._checked_shards(shards, self.readers, "text", "text reader", note)

    def _token_loader(self, reader: int, readers: int, workers: int) -> Any:
        return token_loader(
            self.job_config,
            self.llm.tokenizer,
            self.job_config.data.llm_batch_size,
            dp_rank=reader,
            dp_degree=readers,
            num_workers=workers,
            num_shards=self.text_shards,
        )

    def _reset_loader(self, start: dict[int, dict[str, Any]]) -> None:
        """A fresh own loader whose shards begin at ``start`` (the others at their beginning)."""
        self._start = {int(s): v for s, v in start.items()}
        self.loader = self._token_loader(self.reader, self.readers, self.num_workers)
        self.loader.dataset.start = dict(self._start)
        self.buffer.loader = self.loader

    def _replay(self, origin: list[dict[str, Any]], lane: tuple[int, int]) -> tuple[Any, Any]:
        """An old data-parallel group's refill: its readers' loaders from the saved states, read in
        the order the group dealt its chunks (chunk ``c`` from reader ``(first + c) % tp``, TP-rank
        order); of those, the chunks ``c`` with ``c % lane[1] == lane[0]``."""
        loaders = []
        for o in origin:
            dl = self._token_loader(o["reader"], o["readers"], o["workers"])
            dl.load_state_dict(o["loader"])
            loaders.append(dl)
        first = int(origin[0].get("first", 0))

        def chunks():
            its = [iter(dl) for dl in loaders]
            for c in itertools.count():
                try:
                    batch = next(its[(first + c) % len(its)])
                except StopIteration:
                    return
                if c % lane[1] == lane[0]:  # the others' chunks are only tokenized, to skip them
                    yield batch

        return chunks(), self._extract

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["text"] = {
            "shards": self.text_shards,
            "reader": self.reader,
            "readers": self.readers,
            "workers": self.num_workers,
            "dp_rank": self.dp_rank,
            "tp_rank": self.tp_rank,
            "tp": self.tp_size,
            "start": {s: dict(v) for s, v in self._start.items()},
        }
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_describe(sd.get("describe"))
        text = sd.get("text")
        if text is not None:  # else written before text shards: the default shards, one per worker
            if (int(text["reader"]), int(text["readers"])) != (self.reader, self.readers):
                raise ConfigError(
                    f"This rank's data state was saved by text reader {text['reader']} of {text['readers']}, "
                    f"but it is reader {self.reader} of {self.readers} now: resume on the mesh it was saved on."
                )
            self._set_text_shards(int(text["shards"]))
            self._reset_loader(text["start"])
        self.buffer.load_state_dict(sd["buffer"])

    def load_state_dict_from_ranks(self, sds: list[dict[str, Any]]) -> None:
        """Resume on a different number of ranks from every old rank's state, exactly.

        Every shard continues where the refill its old reader was draining ended; this rank first
        drains the in-flight refills of the old data-parallel groups it adopts (see the module
        docstring). The union over the new ranks of the rows served is what the old ranks would
        have served, in another order.
        """
        for sd in sds:
            self._check_describe(sd.get("describe"))
        if any("text" not in sd for sd in sds):
            raise ConfigError(
                f"This checkpoint's data state was written before text shards existed: resume it on the "
                f"{len(sds)} ranks that saved it, or start fresh."
            )
        self._set_text_shards(int(sds[0]["text"]["shards"]))
        start: dict[int, dict[str, Any]] = {}
        groups: dict[int, list[dict[str, Any]]] = {}
        for sd in sds:
            text, buf = sd["text"], sd["buffer"]
            saved_start = {int(s): v for s, v in text["start"].items()}
            # An own refill being drained: its shards go on from its end. Otherwise (nothing read
            # yet, or an adopted refill being drained) the own shards have not moved since ``start``.
            ends = shard_states(buf["loader_end"]) if buf["started"] and buf.get("origin") is None else {}
            for s in reader_shards(int(text["reader"]), int(text["readers"]), self.text_shards):
                if s in ends or s in saved_start:
                    start[s] = ends.get(s, saved_start.get(s))
            groups.setdefault(int(text["dp_rank"]), []).append(sd)
        refills = []
        for g, members in enumerate(groups[k] for k in sorted(groups)):
            members.sort(key=lambda m: int(m["text"]["tp_rank"]))
            if len(members) != int(members[0]["text"]["tp"]):
                raise ConfigError(f"The checkpoint holds {len(members)} of the data states of TP group {g}.")
            own = [
                {
                    "reader": int(m["text"]["reader"]),
                    "readers": int(m["text"]["readers"]),
                    "workers": int(m["text"]["workers"]),
                    "loader": m["buffer"].get("loader"),
                }
                for m in members
            ]
            if len(members) > 1:  # how the group dealt its refill's chunks over its readers
                for o in own:
                    o["first"] = int(members[0]["buffer"].get("first", 0))
            if g % self.dp_degree == self.dp_rank:
                refills += ShuffleBuffer.in_flight(members[0]["buffer"], own)
        self._reset_loader({s: v for s, v in start.items() if s in self._own_shards()})
        self.buffer.adopt(refills)
        self._log_adopted(len(sds), self.text_shards, "text stream")

    def _own_shards(self) -> list[int]:
        return reader_shards(self.reader, self.readers, self.text_shards)

    def close(self) -> None:
        self.buffer.close()
        self.buffer._it = None
        self.llm = self.extractor = None  # type: ignore[assignment]


def build_stream_source(job_config: Any, ctx: SourceContext) -> ActivationSource:
    return StreamSource(job_config, ctx)


def build_eval_token_loader(
    job_config: Any, tokenizer: Any, batch_size: int, dp_rank: int = 0, dp_degree: int = 1
):
    """Finite held-out token batches ``[batch_size, seq_len]`` for evaluation (``token_loader``)."""
    return token_loader(
        job_config, tokenizer, batch_size, held_out=True, dp_rank=dp_rank, dp_degree=dp_degree
    )
