"""Activations for a TopK / BatchTopK -> JumpReLU conversion: calibration and held-out batches.

``activation_batches(job_config, tokens, split="train")`` reads text from the run's data source,
runs the LLM and returns raw ``(x  # [n, L, d_in], y  # [n, L, d_out])`` pairs (BOS dropped), as
``models.conversion.to_jumprelu`` takes them. ``split="train"``: documents of the training
stream (what calibration should see); ``split="held_out"``: the documents it holds out
(``index % 100 == 99``, the evaluator's text), so the conversion is measured on text neither the
dictionary nor the calibration read. Both read the documents in their stored order, from the
start, so the same call gives the same batches.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torchtitan_clt.data.pipeline import LLMHandle

logger = logging.getLogger(__name__)


@torch.no_grad()
def activation_batches(
    job_config: Any,
    tokens: int,
    split: str = "train",
    llm: LLMHandle | None = None,
    device: str | torch.device = "cpu",
    contexts_per_batch: int = 8,
    layers: list[int] | None = None,
    hooks: tuple[str, str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """About ``tokens`` non-BOS positions of ``job_config.data``'s text as raw fp32 (x, y) on the
    CPU, ``contexts_per_batch × (seq_len − 1)`` rows per pair. ``layers`` / ``hooks`` default to
    the config's (give the model's ``args.layers`` and ``(hook_in, hook_out)`` to be sure)."""
    from torchtitan_clt.data.pipeline import load_llm_handle, token_loader

    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out' (got {split!r}).")
    d = job_config.data
    llm = llm or load_llm_handle(job_config, device)
    loader = token_loader(job_config, llm.tokenizer, contexts_per_batch, split == "held_out", loop=False)
    hook_in, hook_out = hooks or (d.hook_in, d.hook_out)
    extractor = llm.extractor(hook_in, hook_out, layers if layers is not None else d.layers)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    n = 0
    for batch in loader:
        if n >= tokens:
            break
        x, y = extractor(batch)
        out.append((x.float().cpu(), y.float().cpu()))
        n += x.shape[0]
    if n < tokens:
        logger.warning("calibration: the %s text gave %d of the %d tokens asked for.", split, n, tokens)
    return out


def run_batches(
    run: Path | None, model: Any, calib_tokens: int, eval_tokens: int = 0, why: str = "calibration"
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """(training-text, held-out) raw batches for ``model`` (its layers and hooks) from the LLM and
    text of the run folder ``run`` (its ``config.toml``), as the scripts that work on a saved
    checkpoint need them; ``([], None)`` with a warning naming ``why`` when they cannot be had."""
    if calib_tokens <= 0:
        return [], None
    try:
        if run is None:
            raise FileNotFoundError("no run folder (config.toml) to read the LLM and text from")
        from torchtitan_clt.config.manager import load_config
        from torchtitan_clt.data.pipeline import load_llm_handle

        cfg = load_config(["--config", str(Path(run) / "config.toml")], check=False)
        if cfg.data.source == "synthetic":
            raise ValueError("the run trained on synthetic activations, which have no LLM or text")
        a = model.args
        kw = dict(llm=load_llm_handle(cfg, "cpu"), layers=list(a.layers), hooks=(a.hook_in, a.hook_out))
        calib = activation_batches(cfg, calib_tokens, "train", **kw)
        held = activation_batches(cfg, eval_tokens, "held_out", **kw) if eval_tokens > 0 else None
        return calib, held or None
    except Exception as e:  # noqa: BLE001  (any failure to read data falls back, loudly)
        warnings.warn(
            f"{why}: no activations of the run's text ({type(e).__name__}: {e}); the "
            f"{model.args.activation} model keeps its tracked per-layer threshold.",
            stacklevel=2,
        )
        return [], None
