"""Extraction throughput vs a bare forward truncated after the same layer (scripts/benchmark.py).

The extractor should cost no more than the truncated forward it replaces; the gap is the hooks'
copies. Also timed: the full forward (what extraction would cost without the early stop) and the
tokenizer + packing loader alone.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.hooks import check_layers, decoder_layers
from torchtitan_clt.data.llm import load_llm
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, batches: list[torch.Tensor], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    _sync(device)
    return time.perf_counter() - t0


def bench_extraction(
    model_path: str,
    layers: list[int],
    seq_len: int = 128,
    batch: int = 8,
    n_batches: int = 6,
    device: str = "auto",
    dtype: str = "auto",
    hook_in: str = "resid_mid",
    hook_out: str = "mlp_out",
    dataset: str = "shakespeare",
    repeats: int = 3,
) -> dict[str, Any]:
    """Tokens/s of extraction, the bare truncated forward, the full forward and the token loader.

    The three forwards are timed in interleaved rounds after a warm-up and the best round of each
    is kept, so a busy machine disturbs the comparison less.
    """
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    t0 = time.perf_counter()
    model, tok = load_llm(model_path, dtype, dev)
    load_s = time.perf_counter() - t0
    layers = check_layers(model, layers)

    loader = build_token_loader(TextSpec(dataset), tok, seq_len, batch)
    it = iter(loader)
    next(it)  # opening the dataset is not tokenization
    t0 = time.perf_counter()
    batches = [next(it).to(dev) for _ in range(n_batches)]
    tokenize_s = time.perf_counter() - t0
    n_tokens = n_batches * batch * seq_len

    extractor = ActivationExtractor(model, hook_in, hook_out, layers)
    blocks = decoder_layers(model)
    keep = list(blocks)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model

    def bare(b: torch.Tensor) -> None:  # the same prefix of layers, no hooks, no unembedding
        del blocks[layers[-1] + 1 :]
        try:
            base(input_ids=b, use_cache=False)
        finally:
            blocks.extend(keep[len(blocks) :])

    fns = {
        "extraction": extractor,
        "bare_truncated_forward": bare,
        "full_forward": lambda b: model(input_ids=b, use_cache=False),
    }
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            _timed(fn, batches[:1], dev)  # warm-up
        for _ in range(repeats):
            for k, fn in fns.items():
                best[k] = min(best[k], _timed(fn, batches, dev))
    extract_s, bare_s, full_s = best["extraction"], best["bare_truncated_forward"], best["full_forward"]

    def rate(s: float) -> float:
        return round(n_tokens / s, 1)

    return {
        "model_path": model_path,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "dtype": str(next(model.parameters()).dtype),
        "layers": layers,
        "n_model_layers": len(keep),
        "seq_len": seq_len,
        "batch": batch,
        "n_batches": n_batches,
        "repeats": repeats,
        "load_s": round(load_s, 2),
        "tokens_per_s": {
            "extraction": rate(extract_s),
            "bare_truncated_forward": rate(bare_s),
            "full_forward": rate(full_s),
            "tokenize_pack": rate(tokenize_s),
        },
        "extraction_overhead_vs_bare": round(extract_s / bare_s - 1.0, 4),
    }
