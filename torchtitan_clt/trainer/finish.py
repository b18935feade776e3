"""After the loop: held-out evaluation, the report, the exports and the feature pass.

On a mesh the exports are streamed from the sharded model, one source layer at a time
(``checkpoint.sharded_export``; ``exports_streamed`` says when), and the held-out evaluation runs
from the shards on every rank (``metrics/sharded_eval.py``; ``eval_from_shards`` says when), so no
rank holds more than its shard plus one layer; so does the feature pass when the circuit-tracer
export was streamed (``features_from_shards``: every rank reads its share of each layer's features
from the export). What still needs the whole dictionary gathers it onto rank 0 once
(``gather_plain_model``) and reads that copy: the feature pass without that export, the
circuit-tracer JumpReLU conversion of a TopK model (a threshold fit on the whole model), and the
evaluation of a family without the per-layer pieces (MOLT, a user's); the exports then come from
that copy too. A
BatchTopK model gets its inference threshold fitted on training rows before any of them
(``fit_batchtopk``, or ``fit_batchtopk_sharded`` layer by layer on a mesh), so the evaluation, the
exports and the feature examples all see the model as it will be used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.config import JobConfig
from torchtitan_clt.errors import ConfigError
from torchtitan_clt.protocols import ModelSpec
from torchtitan_clt.protocols.transcoder import TranscoderArgs
from torchtitan_clt.tools.logging import logger


def eval_wanted(cfg: JobConfig) -> bool:
    """Whether the run evaluates on held-out text (at the end, or every ``eval.every`` steps)."""
    return cfg.eval.enable or cfg.eval.every > 0


def eval_from_shards(model: Any, args: TranscoderArgs) -> bool:
    """Whether the held-out evaluation runs from the sharded ``model`` on every rank
    (``metrics.sharded_eval.supported``) instead of a copy gathered onto rank 0. A BatchTopK model's
    inference threshold must then be fitted in the shards too (``layer_plan``)."""
    from torchtitan_clt.checkpoint.sharded_export import layer_plan
    from torchtitan_clt.metrics.sharded_eval import supported

    if not supported(model):
        return False
    return args.activation != "batchtopk" or layer_plan(model) is not None


def topk_conversion_wanted(cfg: JobConfig, args: TranscoderArgs) -> bool:
    """Whether the circuit-tracer export converts a TopK model with a threshold fitted on the
    whole model (calibration rows): the one export that reads a gathered copy."""
    return (
        args.activation == "topk"
        and cfg.checkpoint.export_circuit_tracer
        and cfg.checkpoint.export_calibration_tokens > 0
    )


def whole_copy_readers(
    cfg: JobConfig, model: Any, args: TranscoderArgs, world_size: int | None = None
) -> list[str]:
    """The end-of-run passes that read a whole single-device copy of the model on a mesh of
    ``world_size`` ranks (default: this run's) (module docstring); empty when every pass streams
    from the shards."""
    from torchtitan_clt.checkpoint.sharded_export import layer_plan

    out = []
    if eval_wanted(cfg) and not eval_from_shards(model, args):
        out.append(f"the held-out evaluation of a {args.family} model (eval.enable / eval.every)")
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.eval.feature_examples_tokens > 0 and not features_from_shards(cfg, model, args, world_size):
        out.append("the feature pass (eval.feature_examples_tokens)")
    exports = cfg.checkpoint.export or cfg.checkpoint.export_circuit_tracer
    topk_conversion = topk_conversion_wanted(cfg, args)
    if exports and (layer_plan(model) is None or topk_conversion):
        why = "a TopK model's circuit-tracer conversion" if topk_conversion else f"a {args.family} export"
        out.append(f"{why} (checkpoint.export / export_circuit_tracer)")
    return out


def host_budget_bytes() -> int | None:
    """Host memory rank 0 may fill at the end of the run: what the node has available now over
    the ranks it runs (None where /proc/meminfo is not there)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("MemAvailable:")), None)
    if kib is None:
        return None
    return kib * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_whole_copy_fits(cfg: JobConfig, model: Any, args: TranscoderArgs, world_size: int) -> None:
    """Before training: on a mesh, refuse a run whose end would gather a model too big for rank 0's
    host (its state dict and the model built from it, fp32), naming the passes that need it."""
    if world_size == 1 or not dist.is_initialized():
        return
    readers = whole_copy_readers(cfg, model, args, world_size)
    budget = host_budget_bytes()
    if not readers or budget is None:
        return
    need = 2 * sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    if need > budget:
        gib = 2**30
        raise ConfigError(
            f"at the end of the run {', '.join(readers)} would gather the whole dictionary onto rank 0's "
            f"host: {need / gib:.1f} GiB (fp32, plus the state dict it is built from) where "
            f"{budget / gib:.1f} GiB is available per rank on this node. The exports (and the "
            "evaluation of the built-in families) stream from the shards without it: turn those "
            "passes off (--eval.enable=false --eval.every=0 --eval.feature_examples_tokens=0), "
            "and evaluate the export afterwards (scripts/eval.py) on a machine with that much memory."
        )


def gather_plain_model(model: Any, spec: ModelSpec, args: TranscoderArgs, world_size: int) -> Any:
    """A single-device copy of the (possibly sharded) model on rank 0; None elsewhere (collective)."""
    if not dist.is_initialized() or world_size == 1:
        return model
    logger.info("gathering the whole model onto rank 0")  # tests read it: the path taken
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = spec.build_fn(args)
    plain.load_state_dict(sd)
    return plain


def exports_streamed(cfg: JobConfig, model: Any, args: TranscoderArgs, calibration: list) -> bool:
    """Whether the exports come straight from the sharded ``model`` (same on every rank): it is
    sharded, its family has a per-layer fold, and no TopK conversion for circuit-tracer must be
    fitted on the whole model first."""
    from torchtitan_clt.checkpoint.sharded_export import is_sharded, layer_plan

    if not (dist.is_initialized() and is_sharded(model)) or layer_plan(model) is None:
        return False
    # BatchTopK's threshold fit and conversion stream too; TopK's conversion reads the whole model.
    return not (calibration and args.activation == "topk" and cfg.checkpoint.export_circuit_tracer)


def calibration_batches(
    cfg: JobConfig, args: TranscoderArgs, source: Any, y_columns: Any = None
) -> list[tuple[torch.Tensor, ...]]:
    """Raw training rows for the JumpReLU conversion of a TopK / BatchTopK export and for the
    BatchTopK inference threshold. Every rank draws them (the stream source's tp all-gather is
    collective); rank 0 uses them. ``y_columns``: the tp group whose ranks hold columns of y (the
    code layout): the rows' y is gathered whole."""
    tokens = cfg.checkpoint.export_calibration_tokens
    if tokens <= 0 or args.activation not in ("topk", "batchtopk"):
        return []
    batch = min(tokens, cfg.training.batch_size)
    out = []
    with torch.no_grad():
        for _ in range(-(-tokens // batch)):
            x, y = source.next_batch(batch)
            if y_columns is not None and y.shape[-1] != args.d_out:
                from torchtitan_clt.distributed.tp_code import whole_columns

                y = whole_columns(y, y_columns)
            out.append(tuple(t.detach().to("cpu", torch.float32) for t in (x, y)))
    return out


def fit_batchtopk(plain: Any, batches: list, run_folder: Path) -> Any:
    """``plain`` with its BatchTopK inference threshold fitted in place to the training rows
    ``batches`` (logged, and written to report/batchtopk_threshold.json); other models unchanged."""
    from torchtitan_clt.models.conversion import fit_batchtopk_threshold

    fit = fit_batchtopk_threshold(plain, batches) if plain is not None else None
    _report_fit(fit, run_folder)
    return plain


def fit_batchtopk_sharded(model: Any, batches: list, run_folder: Path) -> None:
    """``fit_batchtopk`` of the sharded ``model``, one source layer at a time (every rank calls it;
    the threshold is set on every rank, from rank 0's rows)."""
    from torchtitan_clt.checkpoint.sharded_calibration import fit_batchtopk as fit_streamed
    from torchtitan_clt.checkpoint.sharded_export import LayerStream

    stream = LayerStream(model)
    fit = fit_streamed(stream, batches)
    stream.release()
    if dist.get_rank() == 0:
        _report_fit(fit, run_folder)


def _report_fit(fit: dict | None, run_folder: Path) -> None:
    from torchtitan_clt.models.conversion import describe_batchtopk_fit

    if fit is not None:
        logger.info(describe_batchtopk_fit(fit))
        report = run_folder / "report"
        report.mkdir(parents=True, exist_ok=True)
        (report / "batchtopk_threshold.json").write_text(json.dumps(fit, indent=1))


def export_all(cfg: JobConfig, model: Any, run_folder: Path, calibration: list) -> None:
    """The native and circuit-tracer exports the config asks for: of a gathered model (rank 0
    calls it), or streamed from the sharded one (every rank calls it; ``exports_streamed``)."""
    from torchtitan_clt.checkpoint.export import export_native

    dtype = getattr(torch, cfg.checkpoint.export_dtype)
    if cfg.checkpoint.export:
        export_native(
            model, run_folder / "export", dtype=dtype, max_file_gb=cfg.checkpoint.export_max_file_gb
        )
        logger.info(f"Exported to {run_folder / 'export'}")
    if cfg.checkpoint.export_circuit_tracer:
        from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer

        export_circuit_tracer(model, run_folder / "circuit_tracer", dtype=dtype, calibration=calibration)
        logger.info(f"Exported circuit-tracer folder to {run_folder / 'circuit_tracer'}")


def write_run_report(run_folder: Path, result: dict | None) -> None:
    from torchtitan_clt.metrics.report import write_report

    write_report(
        run_folder,
        result["replacement"] if result else None,
        result["feature_stats"] if result else None,
    )
    logger.info(f"Report written to {run_folder / 'report'}")


def features_from_shards(cfg: JobConfig, model: Any, args: TranscoderArgs, world_size: int) -> bool:
    """Whether the feature pass runs over the ranks (``feature_pass(over_ranks=True)``): on a mesh
    whose circuit-tracer export is streamed from the shards (a family with a per-layer fold, no
    TopK conversion fitted on the whole model), with each layer's features split evenly."""
    from torchtitan_clt.checkpoint.sharded_export import layer_plan

    return (
        world_size > 1
        and cfg.eval.feature_examples_tokens > 0
        and cfg.checkpoint.export_circuit_tracer
        and layer_plan(model) is not None
        and not topk_conversion_wanted(cfg, args)
        and args.features_per_layer % world_size == 0
    )


def export_share(circuit_tracer_folder: str | Path, group: Any = None) -> tuple[Any, Any]:
    """``(FeatureShare, dictionary)`` of this rank in a feature pass over the ranks of ``group``:
    its share of every layer's features, read from the circuit-tracer export's files as slices
    (``load_circuit_tracer(features=...)``: those features' encoder and decoder rows, never a whole
    layer). Every rank then runs ``run_feature_pass(..., share=share)`` on the same batches."""
    from torchtitan_clt.checkpoint.circuit_tracer import export_features_per_layer, load_circuit_tracer
    from torchtitan_clt.metrics.feature_files import FeatureShare

    share = FeatureShare.of(export_features_per_layer(circuit_tracer_folder), group)
    return share, load_circuit_tracer(circuit_tracer_folder, features=(share.lo, share.hi))


def feature_pass(cfg: JobConfig, plain: Any, run_folder: Path, llm: Any, over_ranks: bool = False) -> dict:
    """``eval.feature_examples_tokens`` of held-out text through the run's ``circuit_tracer/``
    export when it was just written (the features circuit-tracer traces with), else through the
    trained model folded; with the source's LLM when it has one (its lock held: the source's
    prefetch thread may share it). ``over_ranks`` (``features_from_shards``): every rank calls
    it, each with its share of the export's features, and ``plain`` is None."""
    from torchtitan_clt.checkpoint.circuit_tracer import is_circuit_tracer_folder, load_circuit_tracer
    from torchtitan_clt.checkpoint.plain import folded_cpu_copy
    from torchtitan_clt.data.pipeline import load_llm_handle, token_loader
    from torchtitan_clt.metrics.feature_files import run_feature_pass

    e = cfg.eval
    ct = run_folder / "circuit_tracer"
    llm = llm or load_llm_handle(cfg, "cpu")
    batches = token_loader(cfg, llm.tokenizer, e.batch_size, held_out=True)  # the same on every rank
    share = None
    if over_ranks:
        dist.barrier()  # rank 0 wrote the export
        share, transcoder = export_share(ct)
        meta = {"name": cfg.job.name, "dictionary": str(ct), "ranks": dist.get_world_size()}
    elif is_circuit_tracer_folder(ct) and cfg.checkpoint.export_circuit_tracer:
        transcoder, meta = load_circuit_tracer(ct), {"name": cfg.job.name, "dictionary": str(ct)}
    else:
        transcoder, meta = folded_cpu_copy(plain), {"name": cfg.job.name, "dictionary": "trained model"}
    with llm.lock:
        return run_feature_pass(
            transcoder,
            llm,
            batches,
            e.feature_examples_tokens,
            run_folder / "features",
            e.feature_examples,
            meta,
            skip_positions=e.feature_skip_positions,
            share=share,
        )
