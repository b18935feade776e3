"""The LLM a run reads, and its text -> tokens -> activations pipeline.

    llm = load_llm_handle(job_config, device)                       # data.model_path, data.model_dtype
    loader = token_loader(job_config, llm.tokenizer, batch_size)    # LongTensor [B, data.seq_len]
    extractor = llm.extractor(hook_in, hook_out, layers)            # tokens -> (x, y) [B*(T-1), L, d]

The stream source, the cache writer, the evaluator, the feature pass and calibration all build
their pipeline from these. A stream source owns its handle (``ActivationSource.llm``) and hands it
to the trainer's evaluator and feature pass; whoever runs its model or tokenizer holds its lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.llm import load_llm
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader


@dataclass(eq=False)
class LLMHandle:
    """An LLM (eval mode, no grads), its tokenizer, and the lock their users hold: a stream
    source's prefetch thread tokenizes and extracts while rank 0 evaluates with the same ones."""

    model: nn.Module
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def extractor(
        self, hook_in: str, hook_out: str, layers: list[int], dtype: torch.dtype = torch.float32
    ) -> ActivationExtractor:
        return ActivationExtractor(self.model, hook_in, hook_out, layers, dtype)


def load_llm_handle(job_config: Any, device: torch.device | str = "cpu", dtype: str = "") -> LLMHandle:
    """``data.model_path`` in ``dtype`` (default ``data.model_dtype``) on ``device``."""
    d = job_config.data
    return LLMHandle(*load_llm(d.model_path, dtype or d.model_dtype, device))


def token_loader(
    job_config: Any, tokenizer: Any, batch_size: int, held_out: bool = False, **kw: Any
) -> StatefulDataLoader:
    """Batches of token windows ``[batch_size, data.seq_len]`` of the run's text (``kw``: the other
    arguments of ``build_token_loader``).

    ``held_out``: the evaluation text, finite. ``eval.dataset`` empty or equal to ``data.dataset``:
    the documents the training stream holds out (global index ``i % 100 == 99``); another dataset:
    all of it.
    """
    d = job_config.data
    spec = TextSpec(d.dataset, d.dataset_config, d.dataset_split, d.text_field)
    if held_out:
        other, kw["loop"] = job_config.eval.dataset, False
        if other and other != spec.dataset:
            spec, held_out = TextSpec(other, "", spec.split, spec.text_field), False
    return build_token_loader(spec, tokenizer, d.seq_len, batch_size, held_out=held_out, **kw)
