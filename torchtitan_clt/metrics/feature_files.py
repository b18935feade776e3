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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from torchtitan_clt.metrics.feature_examples import (
    DEFAULT_SKIP_POSITIONS,
    HIST_BINS,
    MAX_NEIGHBOUR_FEATURES,
    ExampleSlots,
    FeatureExamples,
    FeatureExamplesAccumulator,
    decoder_directions,
    decoder_logits,
    decoder_target_norms,
    nearest_features,
)

if TYPE_CHECKING:
    from torchtitan_clt.data.pipeline import LLMHandle

logger = logging.getLogger(__name__)

WINDOW_BEFORE, WINDOW_AFTER = 24, 8  # tokens shown around an example's strongest activation


@dataclass(frozen=True)
class FeatureShare:
    """A rank's share of a sharded feature pass: features ``lo..hi-1`` of each layer's
    ``n_features``, the ranks of ``group`` together holding all of them."""

    lo: int
    hi: int
    n_features: int
    group: Any = None

    @classmethod
    def of(cls, n_features: int, group: Any = None) -> FeatureShare:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if n_features % world:
            raise ValueError(
                f"a feature pass over {world} ranks splits each layer's {n_features} features evenly: "
                f"use a multiple of {world} (model.features_per_layer) or run scripts/features.py."
            )
        n = n_features // world
        return cls(rank * n, (rank + 1) * n, n_features, group)


SAMPLE_BANDS = 4  # quantile bands the random sample of a feature's contexts is cut into


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


def _example(slots: ExampleSlots, row: int, slot: int, text: TokenText) -> dict[str, Any]:
    """One context as the browser and circuit-tracer show it: a window around its peak."""
    acts = slots.acts[row, slot]  # [T-1], positions 1..T-1
    toks = slots.tokens[row, slot, 1:]
    c = int(slots.peak[row, slot])
    lo, hi = max(0, c - WINDOW_BEFORE), min(acts.shape[0], c + WINDOW_AFTER + 1)
    return {
        "tokens": text(toks[lo:hi].tolist()),
        "acts": [round(float(v), 4) for v in acts[lo:hi]],
        "center": c - lo,
        "max": round(float(slots.values[row, slot]), 4),
        "context": int(slots.context[row, slot]),
        "position": c + 1,  # in its window (BOS = 0)
    }


def quantile_bands(sampled: list[dict[str, Any]], n_bands: int = SAMPLE_BANDS) -> list[dict[str, Any]]:
    """The uniform sample of a feature's firing contexts, sorted by activation and cut into
    ``n_bands`` equal bands: each band's examples lie in that quantile range of the contexts it
    fires on (the sample being uniform), e.g. ``Quantile 50-75%``."""
    ex = sorted(sampled, key=lambda e: -e["max"])
    n = len(ex)
    bands = []
    for b in range(min(n_bands, n)):
        lo, hi = b * n // min(n_bands, n), (b + 1) * n // min(n_bands, n)
        q_hi, q_lo = 100 - round(100 * lo / n), 100 - round(100 * hi / n)
        bands.append({"name": f"Quantile {q_lo}-{q_hi}% (random sample)", "examples": ex[lo:hi]})
    return bands


def _clean(t: str) -> str:
    t = t.replace("\n", "\\n").strip()
    return t if t else repr(t)[1:-1] or "\u2423"


def label_from_examples(record: dict[str, Any], n_in: int = 3, n_out: int = 2) -> str:
    """A short label from a feature's examples: the tokens it fires most on (the peaks of its top
    and sampled contexts, most frequent first) and the tokens its decoder promotes, e.g.
    ``"king" "queen" → "'s" "dom"``."""
    counts: dict[str, float] = {}
    for e in record["examples"] + [e for b in record.get("bands", []) for e in b["examples"]]:
        tok = _clean(e["tokens"][e["center"]])
        counts[tok] = counts.get(tok, 0.0) + 1.0 + e["max"] / max(record["act_max"], 1e-9)
    ins = [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n_in]]
    outs = [_clean(t) for t in record["top_logits"][:n_out]]
    label = " ".join(f'"{t}"' for t in ins)
    if outs:
        label += " \u2192 " + " ".join(f'"{t}"' for t in outs)
    return label


def feature_records(
    ex: FeatureExamples,
    layers: list[int],
    text: TokenText,
    top_ids: torch.Tensor | None = None,
    bottom_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    share: FeatureShare | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready record per feature that fired (the browser's and circuit-tracer's input).
    ``targets``  # [L, F, L]: decoder norm per target layer (a CLT); ``neighbours``: rows and
    cosines ``[L*F, k]`` of the nearest features by decoder direction (rows over every rank's
    features). ``share``: ``ex`` holds features ``share.lo..hi-1`` of each layer."""
    records = []
    density = ex.density
    alive = (ex.fired > 0).nonzero().flatten().tolist()
    offset, n_all = (share.lo, share.n_features) if share is not None else (0, ex.n_features)
    for row in alive:
        j, i_local = divmod(row, ex.n_features)
        i = i_local + offset
        examples = [
            _example(ex.top, row, s, text)
            for s in range(ex.top.values.shape[1])
            if ex.top.context[row, s] >= 0
        ]
        sampled = [
            _example(ex.sampled, row, s, text)
            for s in range(ex.sampled.values.shape[1])
            if ex.sampled.context[row, s] >= 0
        ]
        r = {
            "layer": int(layers[j]),
            "index": i,
            "id": cantor(int(layers[j]), i),
            "density": float(density[row]),
            "act_max": round(float(ex.act_max[row]), 5),  # the true maximum
            "hist": [int(v) for v in ex.hist[row]],
            "hist_top": float(ex.hist_top[row]),
            "examples": examples,
            "bands": quantile_bands(sampled),
            "top_logits": text(top_ids[j, i_local].tolist()) if top_ids is not None else [],
            "bottom_logits": text(bottom_ids[j, i_local].tolist()) if bottom_ids is not None else [],
        }
        if targets is not None:
            r["targets"] = [
                [int(layers[t]), round(float(targets[j, i_local, t]), 4)] for t in range(j, targets.shape[2])
            ]
        if neighbours is not None:
            r["neighbours"] = [
                [int(layers[n // n_all]), n % n_all, round(float(c), 3)]
                for n, c in zip(neighbours[0][row].tolist(), neighbours[1][row].tolist())
            ]
        r["label"] = label_from_examples(r)
        records.append(r)
    return records


def circuit_tracer_feature(record: dict[str, Any], transcoder_id: str) -> dict[str, Any]:
    """A record in the schema of circuit-tracer's ``features/{id}.json`` (plus ``label``, which
    ``label_graph_nodes`` puts on the graph's nodes, and ``hist_top``, the histogram's range)."""

    def examples(exs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "tokens_acts_list": e["acts"],
                "train_token_ind": e["center"],
                "is_repeated_datapoint": False,
                "tokens": e["tokens"],
            }
            for e in exs
        ]

    return {
        "transcoder_id": transcoder_id,
        "index": record["id"],
        "label": record["label"],
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples(record["examples"])}]
        + [{"quantile_name": b["name"], "examples": examples(b["examples"])} for b in record["bands"]],
        "top_logits": record["top_logits"],
        "bottom_logits": record["bottom_logits"],
        "act_min": 0.0,
        "act_max": record["act_max"],  # the true maximum: the UI's colour scale
        "hist_top": record["hist_top"],  # the histogram's bins cover [0, hist_top]
        "quantile_values": _quantiles(record["hist"], record["hist_top"]),
        "histogram": record["hist"],
        "activation_frequency": record["density"],
    }


def feature_labels(folder: str | Path) -> dict[int, str]:
    """``{circuit-tracer id: label}`` of every feature file in ``folder`` (a run's ``features/``)."""
    out = {}
    for p in Path(folder).glob("[0-9]*.json"):
        label = json.loads(p.read_text()).get("label")
        if label:
            out[int(p.stem)] = label
    return out


def feature_label(run_folder: str | Path, layer: int, feature: int) -> str | None:
    """The label of LLM layer ``layer``'s feature ``feature`` in ``run_folder/features/`` (or None)."""
    p = Path(run_folder) / "features" / f"{cantor(layer, feature)}.json"
    return json.loads(p.read_text()).get("label") if p.is_file() else None


def label_graph_nodes(graph_json: str | Path, features: str | Path) -> int:
    """Give every transcoder node of a circuit-tracer graph JSON the label of its feature file
    (its ``clerp``, what circuit-tracer's UI shows as the node's name); rewrites the file and
    returns how many nodes were labelled."""
    labels = feature_labels(features) if Path(features).is_dir() else {}
    path = Path(graph_json)
    doc = json.loads(path.read_text())
    n = 0
    for node in doc["nodes"]:
        if node.get("feature_type") == "cross layer transcoder" and node.get("feature") in labels:
            node["clerp"] = labels[node["feature"]]
            n += 1
    path.write_text(json.dumps(doc))
    return n


def example_stats(ex: FeatureExamples) -> dict[str, Any]:
    """What ``example_summary`` is made of, for the features in ``ex`` (the shares of a sharded
    pass are summed): distinct example contexts per feature that fired, and how many of those
    features' top example peaks right after BOS."""
    fired = ex.fired > 0
    distinct = []
    for row in fired.nonzero().flatten().tolist():
        ctx = set(ex.top.context[row].tolist()) | set(ex.sampled.context[row].tolist())
        distinct.append(len(ctx - {-1}))
    has_top = ex.top.context[:, 0] >= 0
    at_bos = fired & has_top & (ex.top.peak[:, 0] == 0)
    return {"skip_positions": ex.skip_positions, "distinct": distinct, "at_bos": int(at_bos.sum())}


def example_summary(
    ex: FeatureExamples | None, min_contexts: int = 8, stats: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """What the selection achieved, over the features that fired: how many have at least
    ``min_contexts`` distinct example contexts (top and sampled together), and the fraction whose
    top example peaks right after BOS (window position 1, the attention-sink artifact). Of ``ex``,
    or of every rank's ``stats`` (``example_stats``)."""
    stats = stats if stats is not None else [example_stats(ex)]
    distinct = [d for s in stats for d in s["distinct"]]
    n_fired = max(len(distinct), 1)
    return {
        "skip_positions": stats[0]["skip_positions"],
        f"features_with_{min_contexts}_contexts": sum(d >= min_contexts for d in distinct),
        "top_example_after_bos_frac": sum(s["at_bos"] for s in stats) / n_fired,
        "distinct_contexts_median": sorted(distinct)[len(distinct) // 2] if distinct else 0,
    }


def write_feature_examples(
    ex: FeatureExamples,
    folder: str | Path,
    layers: list[int],
    tokenizer: Any,
    top_ids: torch.Tensor | None = None,
    bottom_ids: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
    targets: torch.Tensor | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    share: FeatureShare | None = None,
) -> dict[str, Any]:
    """Write ``folder/{id}.json``, ``folder/index.html``, ``folder/feature.html`` with
    ``folder/data/`` and ``folder/summary.json``; returns the summary. With ``share`` (every rank
    of its group calls this, collectively) each rank writes its own features' files and rank 0
    the index and the summary of all of them; the files are those one process would write."""
    from torchtitan_clt.metrics.feature_html import clear_browser, write_feature_pages, write_index

    folder = Path(folder)
    first = share is None or dist.get_rank(share.group) == 0
    if first:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.json"):
            stale.unlink()
        clear_browser(folder)
    if share is not None:
        dist.barrier(group=share.group)
    records = feature_records(
        ex, layers, TokenText(tokenizer), top_ids, bottom_ids, targets, neighbours, share
    )
    name = str((meta or {}).get("name", folder.parent.name))
    for r in records:
        (folder / f"{r['id']}.json").write_text(json.dumps(circuit_tracer_feature(r, name)))
    mine = (write_feature_pages(records, folder), example_stats(ex))
    parts = [mine]
    if share is not None:  # the index rows and statistics of every rank, on rank 0
        parts = [None] * dist.get_world_size(share.group) if first else None
        dist.gather_object(mine, parts, group_dst=0, group=share.group)
    summary = None
    if first:
        rows = sorted((row for p in parts for row in p[0]), key=lambda row: (row[0], row[1]))
        n_features = share.n_features if share is not None else ex.n_features
        n = ex.n_layers * n_features
        summary = {
            "name": name,
            "tokens": ex.tokens_seen,
            "layers": [int(v) for v in layers],
            "features_per_layer": n_features,
            "features": n,
            "fired": len(rows),
            "dead_frac": 1 - len(rows) / max(n, 1),
            "histogram_bins": HIST_BINS,
            **example_summary(None, stats=[p[1] for p in parts]),
            **(meta or {}),
        }
        write_index(rows, folder, summary)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if share is not None:
        box = [summary]
        dist.broadcast_object_list(box, group_src=0, group=share.group)
        summary = box[0]
    return summary


@torch.no_grad()
def shared_neighbours(transcoder: nn.Module, share: FeatureShare) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``nearest_features`` of this rank's features among every rank's (the decoder directions
    gathered: only below ``MAX_NEIGHBOUR_FEATURES`` features in all, where the one-process pass
    computes them too)."""
    dirs = decoder_directions(transcoder).cpu()  # [L, f, d], this rank's features
    L, f, _ = dirs.shape
    if L * share.n_features > MAX_NEIGHBOUR_FEATURES:
        return None
    parts: list[Any] = [None] * dist.get_world_size(share.group)
    dist.all_gather_object(parts, dirs, group=share.group)
    every = torch.cat(parts, dim=1)  # [L, F, d]
    rows = (torch.arange(L)[:, None] * share.n_features + share.lo + torch.arange(f)).flatten()
    return nearest_features(None, dirs=every, rows=rows)


def run_feature_pass(
    transcoder: nn.Module,
    llm: LLMHandle,
    batches: Iterable[torch.Tensor],
    tokens: int,
    folder: str | Path,
    n_examples: int = 8,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    skip_positions: int = DEFAULT_SKIP_POSITIONS,
    share: FeatureShare | None = None,
) -> dict[str, Any]:
    """Stream ``batches`` (``[B, T]`` token ids) until ``tokens`` tokens, collect the examples of
    every feature of ``transcoder`` and write them to ``folder`` (see ``write_feature_examples``).
    Whole batches are read: the count read (in the summary's ``tokens``, and logged) can exceed
    ``tokens`` by up to one batch, or fall short when the text ends. ``share``: a sharded pass
    (every rank of ``share.group`` calls this with the same batches): ``transcoder`` holds this
    rank's features only (``load_circuit_tracer(features=...)``)."""
    from tqdm.auto import tqdm

    if share is not None and dist.get_rank(share.group) != 0:
        progress = False
    a = transcoder.args
    layers = list(a.layers or range(a.n_layers))
    extractor = llm.extractor(a.hook_in, a.hook_out, layers)
    acc = FeatureExamplesAccumulator(
        transcoder,
        n_examples,
        skip_positions,
        feature_offset=share.lo if share is not None else 0,
        n_features_total=share.n_features if share is not None else None,
    )
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
    if seen != tokens:
        logger.info(
            "feature examples: read %d tokens for the %d asked (%s)",
            seen,
            tokens,
            "whole batches" if seen > tokens else "the held-out text ended",
        )
    ex = acc.result()
    top, bottom = decoder_logits(transcoder, llm.model)
    neighbours = nearest_features(transcoder) if share is None else shared_neighbours(transcoder, share)
    info = {
        "seconds": round(time.perf_counter() - t0, 1),
        "examples_per_feature": n_examples,
        "tokens_asked": tokens,
    }
    summary = write_feature_examples(
        ex,
        folder,
        layers,
        llm.tokenizer,
        top,
        bottom,
        {**info, **(meta or {})},
        decoder_target_norms(transcoder),
        neighbours,
        share,
    )
    logger.info(
        "feature examples: %d tokens, %d of %d features fired (%d with 8+ distinct contexts), written "
        "to %s (index.html) in %.0f s",
        ex.tokens_seen,
        summary["fired"],
        summary["features"],
        summary["features_with_8_contexts"],
        folder,
        time.perf_counter() - t0,
    )
    return summary
