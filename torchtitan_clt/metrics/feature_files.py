"""Write feature examples: circuit-tracer's ``features/`` files and the static HTML browser.

``features/{id}.json`` per feature that fired, ``id = cantor(layer, index)`` (the number
circuit-tracer's graph nodes carry, layer = the LLM layer), in the schema its UI reads
(``examples_quantiles``, ``top_logits``, ``bottom_logits``, ``act_min`` / ``act_max``,
``histogram``, ``quantile_values``, ``activation_frequency``). Beside them ``features/index.html``
and ``features/pages/`` (``feature_html``) and ``features/summary.json``.

``run_feature_pass`` is the whole job for a dictionary and its LLM (an ``LLMHandle``): stream
held-out token batches through the extractor (progress bar with ETA), collect, write.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchtitan_clt.metrics.feature_examples import (
    HIST_BINS,
    FeatureExamples,
    FeatureExamplesAccumulator,
    decoder_logits,
)

if TYPE_CHECKING:
    from torchtitan_clt.data.pipeline import LLMHandle

logger = logging.getLogger(__name__)

WINDOW_BEFORE, WINDOW_AFTER = 24, 8  # tokens shown around an example's strongest activation


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's feature id (its graph JSON's ``feature`` field)."""
    return (layer + index) * (layer + index + 1) // 2 + index


class TokenText:
    """Token id -> its text (decoded alone), cached."""

    def __init__(self, tokenizer: Any):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i not in self.cache:
                self.cache[i] = self.tok.decode([i])
            out.append(self.cache[i])
        return out


def _quantiles(hist: list[int], top: float) -> list[float]:
    """Upper bin edges at the 1st..100th percentiles of the histogram."""
    total = sum(hist)
    if total == 0:
        return []
    out, acc, b = [], 0, 0
    for q in range(1, 101):
        while b < len(hist) - 1 and acc + hist[b] < q / 100 * total:
            acc += hist[b]
            b += 1
        out.append(round((b + 1) / len(hist) * top, 5))
    return out


def feature_records(
    ex: FeatureExamples,
    layers: list[int],
    text: TokenText,
    top_ids: torch.Tensor | None = None,
    bottom_ids: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready record per feature that fired (the browser's and circuit-tracer's input)."""
    records = []
    density = ex.density
    alive = (ex.fired > 0).nonzero().flatten().tolist()
    for row in alive:
        j, i = divmod(row, ex.n_features)
        examples = []
        for slot in range(ex.top_values.shape[1]):
            if int(ex.top_context[row, slot]) < 0:
                continue
            acts = ex.top_acts[row, slot]  # [T-1], positions 1..T-1
            toks = ex.top_tokens[row, slot, 1:]
            c = int(acts.argmax())
            lo, hi = max(0, c - WINDOW_BEFORE), min(acts.shape[0], c + WINDOW_AFTER + 1)
            examples.append(
                {
                    "tokens": text(toks[lo:hi].tolist()),
                    "acts": [round(float(v), 4) for v in acts[lo:hi]],
                    "center": c - lo,
                    "max": round(float(ex.top_values[row, slot]), 4),
                    "context": int(ex.top_context[row, slot]),
                }
            )
        hist = [int(v) for v in ex.hist[row]]
        records.append(
            {
                "layer": int(layers[j]),
                "index": i,
                "id": cantor(int(layers[j]), i),
                "density": float(density[row]),
                "act_max": round(float(ex.act_max[row]), 5),
                "hist": hist,
                "hist_top": float(ex.hist_top[row]),
                "examples": examples,
                "top_logits": text(top_ids[j, i].tolist()) if top_ids is not None else [],
                "bottom_logits": text(bottom_ids[j, i].tolist()) if bottom_ids is not None else [],
            }
        )
    return records


def circuit_tracer_feature(record: dict[str, Any], transcoder_id: str) -> dict[str, Any]:
    """A record in the schema of circuit-tracer's ``features/{id}.json``."""
    return {
        "transcoder_id": transcoder_id,
        "index": record["id"],
        "examples_quantiles": [
            {
                "quantile_name": "Top activations",
                "examples": [
                    {
                        "tokens_acts_list": e["acts"],
                        "train_token_ind": e["center"],
                        "is_repeated_datapoint": False,
                        "tokens": e["tokens"],
                    }
                    for e in record["examples"]
                ],
            }
        ],
        "top_logits": record["top_logits"],
        "bottom_logits": record["bottom_logits"],
        "act_min": 0.0,
        "act_max": record["hist_top"],  # the histogram's range [act_min, act_max]
        "quantile_values": _quantiles(record["hist"], record["hist_top"]),
        "histogram": record["hist"],
        "activation_frequency": record["density"],
    }


def write_feature_examples(
    ex: FeatureExamples,
    folder: str | Path,
    layers: list[int],
    tokenizer: Any,
    top_ids: torch.Tensor | None = None,
    bottom_ids: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``folder/{id}.json``, ``folder/index.html``, ``folder/pages/`` and
    ``folder/summary.json``; returns the summary."""
    from torchtitan_clt.metrics.feature_html import write_browser

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):
        stale.unlink()
    records = feature_records(ex, layers, TokenText(tokenizer), top_ids, bottom_ids)
    name = str((meta or {}).get("name", folder.parent.name))
    for r in records:
        (folder / f"{r['id']}.json").write_text(json.dumps(circuit_tracer_feature(r, name)))
    n = ex.n_layers * ex.n_features
    summary = {
        "name": name,
        "tokens": ex.tokens_seen,
        "layers": [int(v) for v in layers],
        "features_per_layer": ex.n_features,
        "features": n,
        "fired": len(records),
        "dead_frac": 1 - len(records) / max(n, 1),
        "histogram_bins": HIST_BINS,
        **(meta or {}),
    }
    write_browser(records, folder, summary)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def run_feature_pass(
    transcoder: nn.Module,
    llm: LLMHandle,
    batches: Iterable[torch.Tensor],
    tokens: int,
    folder: str | Path,
    n_examples: int = 8,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Stream ``batches`` (``[B, T]`` token ids) until ``tokens`` tokens, collect the examples of
    every feature of ``transcoder`` and write them to ``folder`` (see ``write_feature_examples``)."""
    from tqdm.auto import tqdm

    a = transcoder.args
    layers = list(a.layers or range(a.n_layers))
    extractor = llm.extractor(a.hook_in, a.hook_out, layers)
    acc = FeatureExamplesAccumulator(transcoder, n_examples)
    t0 = time.perf_counter()
    bar = tqdm(total=tokens, unit="tok", desc="feature examples", disable=not progress)
    seen = 0
    for batch in batches:
        if seen >= tokens:
            break
        x, y = extractor(batch)
        acc.update(batch, x)
        seen += batch.numel()
        bar.update(batch.numel())
    bar.close()
    ex = acc.result()
    top, bottom = decoder_logits(transcoder, llm.model)
    info = {"seconds": round(time.perf_counter() - t0, 1), "examples_per_feature": n_examples}
    summary = write_feature_examples(ex, folder, layers, llm.tokenizer, top, bottom, {**info, **(meta or {})})
    logger.info(
        "feature examples: %d tokens, %d of %d features fired, written to %s (index.html) in %.0f s",
        ex.tokens_seen,
        summary["fired"],
        summary["features"],
        folder,
        time.perf_counter() - t0,
    )
    return summary
