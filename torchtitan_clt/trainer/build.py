"""Builders: the trainer's parts from the job config, each returned, none kept here.

The order is the trainer's: names are checked before anything expensive is built; the source
comes before the model (it knows the layer count and widths); the model is built on the meta
device, sharded from outside (``distributed.parallelize``), then materialized and initialized.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchtitan_clt.components.decoder_constraint import build_decoder_constraint
from torchtitan_clt.components.standardization import (
    estimate_standardization,
    init_b_dec_from_mean,
    resolve_b_dec_init,
)
from torchtitan_clt.config import ConfigError, JobConfig, to_toml
from torchtitan_clt.data.source import ActivationSource, SourceContext
from torchtitan_clt.distributed.parallel_dims import ParallelDims
from torchtitan_clt.distributed.parallelize import parallelize_model
from torchtitan_clt.errors import TrainingError
from torchtitan_clt.protocols import (
    ModelSpec,
    activation_registry,
    data_source_registry,
    get_model_spec,
    import_custom_modules,
)
from torchtitan_clt.protocols.model_spec import family_options
from torchtitan_clt.protocols.transcoder import TranscoderArgs
from torchtitan_clt.tools.logging import logger
from torchtitan_clt.trainer import nonfinite


def check_names(cfg: JobConfig) -> tuple[ModelSpec, Callable[..., Any]]:
    """The family's spec and the source's builder, after ``job.custom_import`` registered its own."""
    import_custom_modules(cfg.job.custom_import)
    spec = get_model_spec(cfg.model.name)
    # The family checks its own fields; the resolved values (defaults filled) are what the
    # run folder's config.toml records.
    cfg.model.options = family_options(spec, cfg.model)
    activation_registry.get(cfg.model.activation)
    if spec.activations is not None and cfg.model.activation not in spec.activations:
        raise ConfigError(
            f"model.activation = {cfg.model.activation!r} does not work with model.name = "
            f"{cfg.model.name!r}: choose one of {', '.join(spec.activations)}."
        )
    return spec, data_source_registry.get(cfg.data.source)


def micro_batch_size(cfg: JobConfig, pd: ParallelDims) -> int:
    t = cfg.training
    denom = pd.dp_degree * t.grad_accum_steps
    if t.batch_size % denom:
        raise ConfigError(
            f"training.batch_size ({t.batch_size}) must be divisible by data-parallel degree × "
            f"training.grad_accum_steps ({pd.dp_degree} × {t.grad_accum_steps})."
        )
    return t.batch_size // denom


def make_run_folder(cfg: JobConfig, rank: int) -> Path:
    """``job.dump_folder / job.name``, with the resolved config written into it (rank 0)."""
    folder = Path(cfg.job.dump_folder) / cfg.job.name
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(to_toml(cfg))
    return folder


def build_source(cfg: JobConfig, build_fn: Callable[..., Any], pd: ParallelDims, device: torch.device) -> Any:
    tp_mesh = pd.get_optional_mesh("tp")
    data_group = None
    if tp_mesh is not None and pd.world_mesh is not None:
        # The data's own group per TP group (its broadcasts run on the prefetch thread), created by
        # every rank for every TP group in the same order, as new_group requires.
        tp_groups = pd.world_mesh.mesh.reshape(-1, pd.tp).tolist()
        data_group, _ = torch.distributed.new_subgroups_by_enumeration(tp_groups)
    ctx = SourceContext(
        device=device,
        dp_rank=pd.dp_rank,
        dp_degree=pd.dp_degree,
        tp_group=tp_mesh.get_group() if tp_mesh is not None else None,
        data_group=data_group,
        seed=cfg.job.seed,
    )
    source = build_fn(cfg, ctx)
    if not isinstance(source, ActivationSource):
        raise ConfigError(
            f"data.source = {cfg.data.source!r} built a {type(source).__name__}, which is not an "
            "ActivationSource: subclass torchtitan_clt.data.source.ActivationSource (it gives the "
            "defaults of llm and llm_n_layers, and documents what a source must provide)."
        )
    return source


def model_args_for(cfg: JobConfig, source: Any) -> TranscoderArgs:
    """The model's shape from the config and what the source reads."""
    args = TranscoderArgs.from_job_config(
        cfg,
        n_layers=source.n_layers,
        d_in=source.d_in,
        d_out=source.d_out,
        layers=list(source.layers),
        model_name=source.model_name,
        hook_in=source.hook_in,
        hook_out=source.hook_out,
    )
    if source.llm_n_layers:
        # Lets exporters check that a circuit-tracer CLT covers every layer of its LLM.
        args.extra.setdefault("llm_n_layers", int(source.llm_n_layers))
    return args


def build_model(
    cfg: JobConfig, spec: ModelSpec, args: TranscoderArgs, pd: ParallelDims, device: torch.device
) -> tuple[Any, Any]:
    """The sharded, initialized model and its decoder constraint (or None)."""
    with torch.device("meta"):
        model = spec.build_fn(args)
    model = parallelize_model(model, spec, pd, cfg)  # a no-op in one process
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(cfg.job.seed)
        # Buffers come out of to_empty uninitialized; a family's init need not know about them.
        model.reset_standardization()
    constraint = build_decoder_constraint(model, cfg.model)
    if constraint is not None:
        constraint.normalize()
    if cfg.checkpoint.export_circuit_tracer:
        from torchtitan_clt.checkpoint.circuit_tracer import check_exportable

        check_exportable(model, require_thresholds=False)  # fail now, not after training
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        f"{cfg.model.name} ({cfg.model.activation}): {args.n_layers} layers × "
        f"{cfg.model.features_per_layer} features, d_in {args.d_in}, d_out {args.d_out}, "
        f"{n_params / 1e6:.1f} M parameters, device {device}, mesh {pd}"
        + (", with a linear skip path (model.skip_connection)" if args.skip_connection else "")
    )
    if hasattr(model, "decoder_path"):
        logger.info(f"decoder: {model.decoder_path()}")
    return model, constraint


def build_checkpointer(run_folder: Path, cfg: JobConfig, states: dict[str, Any]) -> Any:
    """A ``CheckpointManager`` over ``states`` (name -> Stateful), or None when disabled."""
    if not cfg.checkpoint.enable:
        return None
    from torchtitan_clt.checkpoint.manager import CheckpointManager
    from torchtitan_clt.checkpoint.stateful import ModelWrapper, RNGState

    states = {**states, "model": ModelWrapper(states["model"]), "rng": RNGState()}
    return CheckpointManager(run_folder, cfg, states)


def standardize(
    cfg: JobConfig, model: Any, source: Any, micro_batch: int, pd: ParallelDims, dp_group: Any
) -> None:
    """Estimate and set the standardization statistics (and ``b_dec`` from the target mean)."""
    s = cfg.standardize
    b_dec_mean = resolve_b_dec_init(cfg.model) == "mean"
    if s.inputs == "none" and s.targets == "none" and not b_dec_mean:
        return
    per_rank = max(1, s.estimate_tokens // pd.dp_degree)
    logger.info(f"Estimating standardization ({s.inputs} / {s.targets}) on {s.estimate_tokens} tokens")
    stats = estimate_standardization(source.next_batch, per_rank, micro_batch, s.inputs, s.targets, dp_group)
    if not all(torch.isfinite(t).all() for t in stats):
        raise TrainingError(
            "Non-finite activations while estimating standardization: the data source gives NaN "
            "or inf values (check the LLM's dtype, e.g. --data.model_dtype=float32, and the data)."
        )
    model.set_standardization(*stats)
    if b_dec_mean:
        init_b_dec_from_mean(model, stats.target_mean)


def autocast_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype | None:
    mp = cfg.training.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]


def build_nonfinite_guard(
    cfg: JobConfig, device: torch.device, optimizers: Any, source: ActivationSource
) -> nonfinite.NonFiniteGuard | None:
    """The deferred finiteness check of ``training.nonfinite_check`` (None: every step's)."""
    how = cfg.training.nonfinite_check
    fused = optimizers.skips_on_device()
    if how == "auto":
        how = "deferred" if nonfinite.on_gpu(device) and fused else "every_step"
    if how == "every_step":
        return None
    if not fused:
        raise ConfigError(
            'training.nonfinite_check = "deferred" skips a bad step inside the fused optimizer, and '
            f"this optimizer is not fused (optimizer.fused = {cfg.optimizer.fused!r}): set "
            "--optimizer.fused=auto (or true), or --training.nonfinite_check=every_step."
        )
    return nonfinite.NonFiniteGuard(source.n_layers, device, source.layers, source.hook_in, source.hook_out)
