"""Activation sources: what the trainer pulls ``(x, y)`` batches from.

``stream``: text -> tokens -> LLM forward with hooks -> shuffle buffer on the training device.
Builders have the signature ``build(job_config, ctx: SourceContext) -> ActivationSource`` and are
registered by name in ``data_source_registry`` (see ``torchtitan_clt/data/__init__.py``).

Tensor parallelism: every rank of a TP group must train on the same batch, but no context should be
run through the LLM twice. So each TP rank reads its own share of the text (the text is sharded
over ``dp_degree × tp`` readers), extracts it, and the group all-gathers the rows before they enter
the buffer; the buffers are then equal on every TP rank (same rows, same shuffling seed).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.buffer import ShuffleBuffer
from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.hooks import check_layers, d_model, family, n_layers
from torchtitan_clt.data.llm import load_llm, model_name
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader

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

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

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


def text_spec(job_config: Any) -> TextSpec:
    d = job_config.data
    return TextSpec(d.dataset, d.dataset_config, d.dataset_split, d.text_field)


class BufferedSource(ActivationSource):
    """A source whose rows come out of a ``ShuffleBuffer`` (``self.buffer``): batching and state."""

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.buffer.next_batch(batch_size)
        return x.to(self.device, torch.float32), y.to(self.device, torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "describe": self.describe()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_describe(sd.get("describe"))
        self.buffer.load_state_dict(sd["buffer"])


class StreamSource(BufferedSource):
    """Activations read live from an LLM forward over this rank's share of the text."""

    def __init__(self, job_config: Any, ctx: SourceContext, llm: Any = None, tokenizer: Any = None):
        d = job_config.data
        self.device = torch.device(ctx.device)
        if llm is None:
            llm, tokenizer = load_llm(d.model_path, d.model_dtype, self.device)
        family(llm)  # unsupported architectures stop here, with the supported list
        self.llm, self.tokenizer = llm, tokenizer
        self.layers = check_layers(llm, list(d.layers))
        self.n_layers = len(self.layers)
        self.llm_n_layers = n_layers(llm)
        # Held while the buffer tokenizes and extracts (possibly on the prefetch thread); anyone else
        # using this LLM or tokenizer (the evaluator shares them) holds it too.
        self.llm_lock = threading.Lock()
        self.d_in = self.d_out = d_model(llm)
        self.hook_in, self.hook_out = d.hook_in, d.hook_out
        self.model_name = model_name(d.model_path)

        self.tp_rank, self.tp_size = _tp_info(ctx.tp_group)
        self.tp_group = ctx.tp_group
        reader, readers = ctx.dp_rank * self.tp_size + self.tp_rank, ctx.dp_degree * self.tp_size
        self.loader = build_token_loader(
            text_spec(job_config),
            tokenizer,
            d.seq_len,
            d.llm_batch_size,
            dp_rank=reader,
            dp_degree=readers,
            num_workers=d.num_workers,
        )
        llm_dtype = next(llm.parameters()).dtype
        self.extractor = ActivationExtractor(llm, d.hook_in, d.hook_out, self.layers, dtype=llm_dtype)
        buffer_device = self.device if d.buffer_device == "auto" else torch.device(d.buffer_device)
        prefetch = d.prefetch and self.tp_size == 1  # the TP all-gather must stay on the main thread
        self.buffer = ShuffleBuffer(
            self.loader,
            self._extract,
            d.buffer_tokens,
            d.buffer_passes,
            buffer_device,
            ctx.seed,
            prefetch,
            self.llm_lock,
        )
        rows = d.buffer_tokens * self.n_layers * (self.d_in + self.d_out) * llm_dtype.itemsize
        logger.info(
            "stream source: %s, layers %s, %s -> %s, buffer %d rows (%.2f GiB on %s, prefetch %s)",
            self.model_name,
            self.layers,
            self.hook_in,
            self.hook_out,
            d.buffer_tokens,
            rows / 2**30 * (2 if prefetch else 1),
            buffer_device,
            "on" if prefetch else "off",
        )

    def _extract(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.extractor(tokens)  # [B*(T-1), L, d] each
        if self.tp_size > 1:
            x, y = (
                _all_gather_rows(x, self.tp_group, self.tp_size),
                _all_gather_rows(y, self.tp_group, self.tp_size),
            )
        return x, y

    def load_state_dict_from_ranks(self, sds: list[dict[str, Any]]) -> None:
        """Resume on a different number of ranks from every old rank's state (approximate).

        The text position is global, so every new reader starts at the earliest refill start
        among the old readers (no document is skipped; documents the old buffers held are read
        again) with its own new share. The shuffle buffer starts fresh.
        """
        for sd in sds:
            self._check_describe(sd.get("describe"))
        positions = [
            p for sd in sds if sd["buffer"]["started"] for p in _packer_states(sd["buffer"]["loader"])
        ]
        if not positions:
            return
        start = min(positions, key=lambda p: (p["docs"]["epoch"], p["docs"]["index"]))
        docs = {k: v for k, v in start["docs"].items() if k in ("epoch", "index", "hf_state")}
        logger.warning(
            "Resuming the text stream from %d saved ranks at epoch %d, document %d (approximate: "
            "documents in the old buffers are read again).",
            len(sds),
            docs["epoch"],
            docs["index"],
        )
        dataset = self.loader.dataset
        dataset.load_state_dict(
            {
                "docs": {**dataset.docs.state_dict(), **docs, "hf_state": docs.get("hf_state")},
                "offset": 0,
                "windows": 0,
            }
        )

    def close(self) -> None:
        self.buffer.close()
        self.buffer._it = None
        self.llm = self.extractor = None  # type: ignore[assignment]


def _packer_states(obj: Any) -> list[dict[str, Any]]:
    """Every ``PackedTokens`` state inside a loader state (one per DataLoader worker)."""
    if isinstance(obj, dict):
        if "docs" in obj and "offset" in obj:
            return [obj]
        return [p for v in obj.values() for p in _packer_states(v)]
    return []


def _all_gather_rows(t: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def build_stream_source(job_config: Any, ctx: SourceContext) -> ActivationSource:
    return StreamSource(job_config, ctx)


def build_eval_token_loader(
    job_config: Any, tokenizer: Any, batch_size: int, dp_rank: int = 0, dp_degree: int = 1
):
    """Finite held-out token batches ``[batch_size, seq_len]`` for evaluation.

    ``eval.dataset`` empty or equal to ``data.dataset``: the documents the training stream holds
    out (global index ``i % 100 == 99``). Another dataset: all of it.
    """
    spec = text_spec(job_config)
    other = job_config.eval.dataset
    held_out = not other or other == spec.dataset
    if not held_out:
        spec = TextSpec(other, "", spec.split, spec.text_field)
    return build_token_loader(
        spec,
        tokenizer,
        job_config.data.seq_len,
        batch_size,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
        held_out=held_out,
        loop=False,
    )
