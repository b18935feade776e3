"""Periodic evaluation during training: the LLM and the held-out token batches, built once.

    evaluator = build_evaluator(job_config, device, llm=source.llm)   # the source's LLMHandle, or None
    result = evaluator.run(plain_model, step)       # one process, or rank 0 with a gathered copy
    result = evaluator.run(sharded_model, step)     # every rank of the mesh (metrics/sharded_eval.py)
    metrics_logger.log(step, evaluator.log_metrics(result))
    write_report(run_folder, result["replacement"], result["feature_stats"])   # at the end

``run`` returns ``{"step", "replacement": evaluate_replacement(...), "feature_stats":
feature_stats(...)}``; the feature statistics are taken on the activations of the same held-out
tokens (BOS excluded). The ablation baselines do not depend on the dictionary: they are computed
on the first ``run`` and reused. The evaluator holds the handle's lock while it runs the LLM or
tokenizer (a stream source's prefetch thread shares them).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import nn

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data.pipeline import LLMHandle, load_llm_handle, token_loader
from torchtitan_clt.metrics.eval import (
    Baselines,
    SpliceSpec,
    compute_baselines,
    evaluate_replacement,
    flat_metrics,
)
from torchtitan_clt.metrics.feature_stats import FeatureStatsAccumulator
from torchtitan_clt.metrics.sharded_eval import ShardedFeatureStats, supported, tp_shards

logger = logging.getLogger(__name__)


def held_out_batches(job_config: Any, tokenizer: Any, tokens: int, batch_size: int) -> list[torch.Tensor]:
    """Held-out token batches ``[batch_size, seq_len]`` (CPU) until ``tokens`` tokens are reached."""
    loader = token_loader(job_config, tokenizer, batch_size, held_out=True)
    batches: list[torch.Tensor] = []
    n = 0
    for batch in loader:
        if n >= tokens:
            break
        batches.append(batch)
        n += batch.numel()
    if not batches:
        raise ConfigError(
            f"eval: the held-out text ({job_config.eval.dataset or job_config.data.dataset!r}) gave no "
            f"full batch of {batch_size} × {job_config.data.seq_len} tokens; lower eval.batch_size or "
            "data.seq_len, or set eval.dataset to a larger text."
        )
    if n < tokens:
        logger.warning(
            "eval: the held-out text has only %d of the %d tokens asked for (eval.tokens).", n, tokens
        )
    return batches


class Evaluator:
    """Replacement-model evaluation and feature statistics on fixed held-out batches."""

    def __init__(
        self,
        job_config: Any,
        device: torch.device | str = "cpu",
        llm: LLMHandle | None = None,
    ):
        e = job_config.eval
        self.device = torch.device(device)
        self.llm = llm = llm or load_llm_handle(job_config, self.device)
        self.open_loop = e.open_loop
        self.dense_threshold = e.dense_threshold
        with llm.lock:
            self.batches = held_out_batches(job_config, llm.tokenizer, e.tokens, e.batch_size)
        self._baselines: Baselines | None = None
        self.last: dict[str, Any] | None = None
        logger.info(
            "eval: %d held-out batches of %s tokens%s",
            len(self.batches),
            tuple(self.batches[0].shape),
            ", open loop per layer" if self.open_loop else "",
        )

    @torch.no_grad()
    def run(
        self, transcoder: nn.Module, step: int | None = None, open_loop: bool | None = None
    ) -> dict[str, Any]:
        """Evaluate a plain ``Transcoder`` (any device), or a model sharded over the mesh whose
        family ``sharded_eval.supported`` (every rank calls it then; each gets the same result);
        its train/eval mode is restored.

        ``open_loop``: override ``eval.open_loop`` for this run (e.g. only at the end)."""
        t0 = time.perf_counter()
        open_loop = self.open_loop if open_loop is None else open_loop
        llm = self.llm.model
        spec = SpliceSpec.of(transcoder, llm)
        sharded = supported(transcoder)
        shards = tp_shards(transcoder) if sharded else contextlib.nullcontext()
        with self.llm.lock, shards as ops:
            b = self._baselines
            if b is None or b.spec != spec:
                b = compute_baselines(llm, self.batches, spec, per_layer=open_loop)
            elif open_loop and not b.zero_per_layer:
                b = compute_baselines(llm, self.batches, spec, per_layer=True, reuse=b)
            self._baselines = b
            replacement = evaluate_replacement(
                llm, transcoder, self.batches, open_loop=open_loop, baselines=b, ops=ops
            )
            stats = (
                ShardedFeatureStats(ops.tc, ops, self.dense_threshold)
                if sharded
                else FeatureStatsAccumulator(transcoder, self.dense_threshold)
            )
            extractor = self.llm.extractor(spec.hook_in, spec.hook_out, spec.layers)
            for tokens in self.batches:
                stats.update(*extractor(tokens))
            features = stats.compute()  # sharded: reads the decoder shards, gathers the counts
        self.last = {"step": step, "replacement": replacement, "feature_stats": features}
        c = replacement["closed_loop"]
        logger.info(
            "eval%s: CE clean %.4f, replacement %.4f (ΔCE %.4f), CE recovered %.3f (zero) %.3f (mean), "
            "KL %.4f, top-1 %.3f; FVU %.4f, L0 %.1f (%.1f s%s)",
            "" if step is None else f" step {step}",
            replacement["ce_clean"],
            c["ce"],
            c["delta_ce"],
            c["ce_recovered_zero"],
            c["ce_recovered_mean"],
            c["kl"],
            c["top1_agreement"],
            self.last["feature_stats"]["fvu"],
            self.last["feature_stats"]["l0"],
            time.perf_counter() - t0,
            ", from the shards" if sharded else "",
        )
        return self.last

    @staticmethod
    def log_metrics(result: dict[str, Any]) -> dict[str, Any]:
        """Flat ``eval_*`` scalars and per-layer lists for ``MetricsLogger.log``."""
        out = flat_metrics(result["replacement"])
        fs = result["feature_stats"]
        for k in ("fvu", "nmse", "l0", "dead_frac", "dense_frac"):
            out[f"eval_{k}"] = fs[k]
        out["eval_fvu_per_layer"] = list(fs["fvu_per_layer"])
        out["eval_l0_per_layer"] = list(fs["l0_per_layer"])
        return out

    def close(self) -> None:
        self.llm = None  # type: ignore[assignment]
        self.batches = []


def build_evaluator(
    job_config: Any, device: torch.device | str = "cpu", llm: LLMHandle | None = None
) -> Evaluator:
    """The trainer's evaluator; pass the activation source's ``llm`` to share it."""
    return Evaluator(job_config, device, llm)
