"""The trainer: builds every part from the config and runs the loop.

text -> tokens -> LLM activations -> shuffle buffer -> batch -> dictionary -> loss -> step.
Run through ``./run_train.sh`` (torchrun), or ``python -m torchtitan_clt.train`` in one process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_clt import kernels
from torchtitan_clt.components.decoder_constraint import build_decoder_constraint
from torchtitan_clt.components.lr_scheduler import build_lr_scheduler
from torchtitan_clt.components.optimizer import build_optimizer, clip_grad_norm_
from torchtitan_clt.components.standardization import (
    estimate_standardization,
    init_b_dec_from_mean,
    resolve_b_dec_init,
)
from torchtitan_clt.config import ConfigError, InputError, JobConfig, help_text, load_config, to_toml
from torchtitan_clt.data.source import SourceContext
from torchtitan_clt.distributed.loss import build_loss_fn_for_mesh
from torchtitan_clt.distributed.utils import check_config_consistent, init_distributed
from torchtitan_clt.errors import TrainingError
from torchtitan_clt.metrics.logger import MetricsLogger
from torchtitan_clt.metrics.training import DeadFeatureTracker, FVUAccumulator, l0_per_layer
from torchtitan_clt.models.activations import BatchTopK
from torchtitan_clt.models.losses import dead_after_tokens_of
from torchtitan_clt.protocols import (
    activation_registry,
    data_source_registry,
    get_model_spec,
    import_custom_modules,
)
from torchtitan_clt.protocols.transcoder import TranscoderArgs
from torchtitan_clt.tools.guards import all_finite, describe_nonfinite
from torchtitan_clt.tools.logging import init_logger, logger
from torchtitan_clt.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_clt.tools.signals import Preempted, exit_now, stop_and_save, stop_on_signals
from torchtitan_clt.tools.utils import device_from_config, set_determinism


class TrainState:
    """The trainer's own progress, checkpointed like everything else."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.tokens = int(sd["tokens"])


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        import_custom_modules(cfg.job.custom_import)
        # Names are checked before anything expensive is built.
        self.spec = get_model_spec(cfg.model.name)
        activation_registry.get(cfg.model.activation)
        if self.spec.activations is not None and cfg.model.activation not in self.spec.activations:
            raise ConfigError(
                f"model.activation = {cfg.model.activation!r} does not work with model.name = "
                f"{cfg.model.name!r}: choose one of {', '.join(self.spec.activations)}."
            )
        build_source = data_source_registry.get(cfg.data.source)

        self.parallel_dims = pd = init_distributed(cfg)
        check_config_consistent(cfg)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = device_from_config(cfg)
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        kernels.configure_from_job(cfg)

        self.run_folder = Path(cfg.job.dump_folder) / cfg.job.name
        if self.rank == 0:
            self.run_folder.mkdir(parents=True, exist_ok=True)
            (self.run_folder / "config.toml").write_text(to_toml(cfg))

        t = cfg.training
        denom = pd.dp_degree * t.grad_accum_steps
        if t.batch_size % denom:
            raise ConfigError(
                f"training.batch_size ({t.batch_size}) must be divisible by data-parallel degree × "
                f"training.grad_accum_steps ({pd.dp_degree} × {t.grad_accum_steps})."
            )
        self.micro_batch = t.batch_size // denom

        tp_mesh = pd.get_optional_mesh("tp")
        self.source = build_source(
            cfg,
            SourceContext(
                device=self.device,
                dp_rank=pd.dp_rank,
                dp_degree=pd.dp_degree,
                tp_group=tp_mesh.get_group() if tp_mesh is not None else None,
                seed=cfg.job.seed,
            ),
        )
        src = self.source
        self.model_args = TranscoderArgs.from_job_config(
            cfg,
            n_layers=src.n_layers,
            d_in=src.d_in,
            d_out=src.d_out,
            layers=list(src.layers),
            model_name=src.model_name,
            hook_in=src.hook_in,
            hook_out=src.hook_out,
        )
        if getattr(src, "llm_n_layers", None):
            # Lets exporters check that a circuit-tracer CLT covers every layer of its LLM.
            self.model_args.extra.setdefault("llm_n_layers", int(src.llm_n_layers))
        with torch.device("meta"):
            model = self.spec.build_fn(self.model_args)
        if pd.world_size > 1:
            if self.spec.parallelize_fn is None:
                raise ConfigError(
                    f"model.name = {cfg.model.name!r} has no parallelize_fn, so it cannot train on "
                    f"{pd.world_size} processes: run it with NGPU=1, or register a parallelize_fn in its ModelSpec."
                )
            model = self.spec.parallelize_fn(model, pd, cfg)
        model.to_empty(device=self.device)
        with torch.no_grad():
            model.init_weights(cfg.job.seed)
            # Buffers come out of to_empty uninitialized; a family's init need not know about them.
            model.reset_standardization()
        self.decoder_constraint = build_decoder_constraint(model, cfg.model)
        if self.decoder_constraint is not None:
            self.decoder_constraint.normalize()
        self.model = model
        if cfg.checkpoint.export_circuit_tracer:
            from torchtitan_clt.checkpoint.circuit_tracer import check_exportable

            check_exportable(model, require_thresholds=False)  # fail now, not after training
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            f"{cfg.model.name} ({cfg.model.activation}): {src.n_layers} layers × "
            f"{cfg.model.features_per_layer} features, d_in {src.d_in}, d_out {src.d_out}, "
            f"{n_params / 1e6:.1f} M parameters, device {self.device}, mesh {pd}"
            + (", with a linear skip path (model.skip_connection)" if self.model_args.skip_connection else "")
        )
        if hasattr(model, "decoder_path"):
            logger.info(f"decoder: {model.decoder_path()}")

        self.forward = torch.compile(model.forward_std) if t.compile else model.forward_std
        self.optimizers = build_optimizer(model, cfg)
        self.lr_schedulers = build_lr_scheduler(self.optimizers, cfg, t.steps)
        self.train_state = TrainState()
        dp_mesh = pd.get_optional_mesh("dp")
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None else None
        self.dead = DeadFeatureTracker(
            src.n_layers,
            cfg.model.features_per_layer,
            dead_after_tokens_of(cfg),
            device=self.device,
            group=self.dp_group,
        )
        self.loss_fn = build_loss_fn_for_mesh(cfg, pd, dead_features=self.dead)  # AuxK reads dead_mask()
        self.autocast_dtype = _autocast_dtype(cfg, self.device)

        self.checkpointer = None
        if cfg.checkpoint.enable:
            from torchtitan_clt.checkpoint.manager import CheckpointManager
            from torchtitan_clt.checkpoint.stateful import ModelWrapper, RNGState

            self.checkpointer = CheckpointManager(
                self.run_folder,
                cfg,
                {
                    "model": ModelWrapper(model),
                    "optimizer": self.optimizers,
                    "lr_scheduler": self.lr_schedulers,
                    "data": self.source,
                    "train_state": self.train_state,
                    "dead_features": self.dead,
                    "rng": RNGState(),
                },
                parallel_dims=pd,
            )
            resumed = self.checkpointer.load()
            if resumed is not None:
                logger.info(f"Resumed from step {self.train_state.step} ({self.train_state.tokens} tokens)")
        if self.train_state.step == 0:
            self._standardize()
        self.evaluator = None
        self._batchtopk_fit = None  # the inference threshold fitted at the end (_calibrated)
        if (cfg.eval.enable or cfg.eval.every > 0) and self.rank == 0:
            from torchtitan_clt.metrics.evaluator import build_evaluator

            self.evaluator = build_evaluator(cfg, self.device, llm=src.llm)  # the source's LLM, if any
        ts = self.train_state
        self.metrics = MetricsLogger(
            self.run_folder, cfg, self.rank, device=self.device, start_step=ts.step, start_tokens=ts.tokens
        )

    def _standardize(self) -> None:
        s = self.cfg.standardize
        b_dec_mean = resolve_b_dec_init(self.cfg) == "mean"
        if s.inputs == "none" and s.targets == "none" and not b_dec_mean:
            return
        per_rank = max(1, s.estimate_tokens // self.parallel_dims.dp_degree)
        logger.info(f"Estimating standardization ({s.inputs} / {s.targets}) on {s.estimate_tokens} tokens")
        stats = estimate_standardization(
            self.source.next_batch, per_rank, self.micro_batch, s.inputs, s.targets, self.dp_group
        )
        if not all(torch.isfinite(t).all() for t in stats):
            raise TrainingError(
                "Non-finite activations while estimating standardization: the data source gives NaN "
                "or inf values (check the LLM's dtype, e.g. --data.model_dtype=float32, and the data)."
            )
        self.model.set_standardization(*stats)
        if b_dec_mean:
            init_b_dec_from_mean(self.model, stats.target_mean)

    def _micro_step(self, step: int, fvu: FVUAccumulator | None, l0_sum: list) -> torch.Tensor:
        t0 = time.perf_counter()
        x, y = self.source.next_batch(self.micro_batch)  # [B, L, d_in], [B, L, d_out] raw
        self.data_wait_s += time.perf_counter() - t0
        m = self.model
        batch_ok = all_finite(x, y)  # read with the loss check: no extra device sync
        xs, ys = m.standardize_in(x), m.standardize_out(y)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            out = self.forward(xs)
            loss, terms = self.loss_fn(m, out, ys, step)
        if not bool(torch.isfinite(loss) & batch_ok):
            if not bool(batch_ok):
                src = self.source
                raise TrainingError(describe_nonfinite(step, x, y, src.layers, src.hook_in, src.hook_out))
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise TrainingError(
                f"Non-finite loss at step {step}: {loss.item()} (non-finite terms: {', '.join(bad) or 'none'}; "
                f"terms { ({k: float(v) for k, v in terms.items()}) }). Lower optimizer.lr, raise "
                "training.max_norm clipping, or check the data for NaNs. Weights were not updated."
            )
        (loss / self.cfg.training.grad_accum_steps).backward()
        acts = out.acts.detach()
        self.dead.update(acts, x.shape[0])
        if fvu is not None:
            with torch.no_grad():
                y_hat = m.unstandardize_out(out.y_hat.detach().float())
                fvu.update(y, y_hat)
                l0_sum.append(l0_per_layer(acts))
        for k, v in terms.items():
            self.term_sums[k] = self.term_sums.get(k, 0.0) + v.detach().float()
        return loss.detach()

    def train_step(self, step: int, fvu: FVUAccumulator | None = None):
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns (mean loss, grad
        norm, per-micro-batch L0 lists when ``fvu`` is given)."""
        t = self.cfg.training
        l0_sum: list = []
        self.term_sums: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum_steps):
            loss_sum += self._micro_step(step, fvu, l0_sum)
        if self.decoder_constraint is not None:
            self.decoder_constraint.project_grads()
        grad_norm = clip_grad_norm_(self.model.parameters(), t.max_norm)
        self.optimizers.step()
        if self.decoder_constraint is not None:
            self.decoder_constraint.normalize()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        return loss_sum / t.grad_accum_steps, grad_norm, l0_sum

    def train(self) -> dict:
        cfg, ts = self.cfg, self.train_state
        t = cfg.training
        last: dict = {}
        logger.info(
            f"Training {t.steps} steps of {t.batch_size} tokens (micro-batch {self.micro_batch} × "
            f"{t.grad_accum_steps} accumulation × {self.parallel_dims.dp_degree} data-parallel)"
        )
        t_window = time.perf_counter()
        self.data_wait_s = 0.0
        self.metrics.reset_timer(ts.step, ts.tokens)
        with (
            maybe_enable_profiling(cfg, self.run_folder, ts.step) as profiler,
            maybe_enable_memory_snapshot(cfg, self.run_folder, ts.step) as mem_snapshot,
            stop_on_signals() as stop,
        ):
            while ts.step < t.steps:
                ts.step += 1
                step = ts.step
                log_now = step % cfg.metrics.log_freq == 0 or step == t.steps or step == 1
                fvu = FVUAccumulator() if log_now else None
                loss, grad_norm, l0_sum = self.train_step(step, fvu)
                ts.tokens += t.batch_size
                if log_now:
                    elapsed = time.perf_counter() - t_window
                    last = self._log(step, loss, grad_norm, fvu, l0_sum, self.data_wait_s, elapsed)
                    t_window, self.data_wait_s = time.perf_counter(), 0.0
                if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < t.steps:
                    self._evaluate(step, open_loop=False)
                if self.checkpointer is not None:
                    self.checkpointer.save(step, last_step=step == t.steps)
                if profiler is not None:
                    profiler.step()
                if mem_snapshot is not None:
                    mem_snapshot.step()
                if (signum := stop.agreed()) and step < t.steps:  # SIGTERM / SIGUSR1 on any rank
                    stop_and_save(self, step, stop, signum)
        self._finish()
        return last

    def _log(self, step, loss, grad_norm, fvu, l0_sum, data_wait_s, elapsed) -> dict:
        n = self.cfg.training.grad_accum_steps
        scalars = {"loss": loss, **{k: v / n for k, v in self.term_sums.items()}}
        l0_layers = torch.stack(l0_sum).mean(0)  # [L]
        if self.dp_group is not None:
            for v in (*scalars.values(), l0_layers):
                dist.all_reduce(v, group=self.dp_group)
                v /= self.parallel_dims.dp_degree
        fvu_layers = fvu.compute(self.dp_group)  # [L], exact over all ranks' rows
        loss = scalars.pop("loss")
        metrics = {
            "tokens": self.train_state.tokens,
            "loss": float(loss),
            "terms": {k: float(v) for k, v in scalars.items()},
            "fvu_per_layer": [round(float(v), 5) for v in fvu_layers],
            "l0_per_layer": [round(float(v), 3) for v in l0_layers],
            "dead_frac": float(self.dead.dead_fraction()),
            "lr": self.lr_schedulers.get_last_lr(),
            "grad_norm": float(grad_norm),
            "data_wait_frac": data_wait_s / max(elapsed, 1e-9),
        }
        return self.metrics.log(step, metrics) or metrics

    def _evaluate(self, step: int, open_loop: bool, calibration=None) -> dict | None:
        """Replacement-model evaluation on held-out text, once (rank 0), on a gathered model
        (with ``calibration``: its BatchTopK threshold fitted to those training rows first)."""
        plain = self._gather_plain_model() if (self.cfg.eval.enable or self.cfg.eval.every) else None
        if calibration is not None:
            plain = self._calibrated(plain, calibration)
        result = None
        if plain is not None and self.evaluator is not None:
            result = self.evaluator.run(plain.to(self.device), step, open_loop=open_loop)
            self.metrics.log(step, self.evaluator.log_metrics(result))
        if dist.is_initialized():
            dist.barrier()
        return result

    def _finish(self) -> None:
        cfg = self.cfg
        result = None
        # Training rows for the inference threshold of BatchTopK and the circuit-tracer conversion.
        uses = (
            cfg.eval.enable or cfg.eval.every > 0 or cfg.checkpoint.export or cfg.eval.feature_examples_tokens
        )
        need = cfg.checkpoint.export_circuit_tracer or (self.model_args.activation == "batchtopk" and uses)
        calibration = self._calibration_batches() if need else []
        if cfg.eval.enable or cfg.eval.every > 0:
            result = self._evaluate(
                self.train_state.step, open_loop=cfg.eval.open_loop, calibration=calibration
            )
        if self.rank == 0:
            from torchtitan_clt.metrics.report import write_report

            write_report(
                self.run_folder,
                result["replacement"] if result else None,
                result["feature_stats"] if result else None,
            )
            logger.info(f"Report written to {self.run_folder / 'report'}")
        if self.checkpointer is not None:
            self.checkpointer.close()
        if cfg.checkpoint.export or cfg.checkpoint.export_circuit_tracer:
            plain = self._calibrated(self._gather_plain_model(), calibration)
            if plain is not None:
                from torchtitan_clt.checkpoint.export import export_native

                dtype = getattr(torch, cfg.checkpoint.export_dtype)
                if cfg.checkpoint.export:
                    export_native(plain, self.run_folder / "export", dtype=dtype)
                    logger.info(f"Exported to {self.run_folder / 'export'}")
                if cfg.checkpoint.export_circuit_tracer:
                    from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer

                    export_circuit_tracer(
                        plain, self.run_folder / "circuit_tracer", dtype=dtype, calibration=calibration
                    )
                    logger.info(f"Exported circuit-tracer folder to {self.run_folder / 'circuit_tracer'}")
        if cfg.eval.feature_examples_tokens > 0:
            plain = self._calibrated(self._gather_plain_model(), calibration)
            if plain is not None:  # rank 0
                from torchtitan_clt.metrics.feature_files import trainer_feature_pass

                trainer_feature_pass(cfg, self.run_folder, plain, self.source.llm)  # holds the LLM's lock
        self.metrics.close()
        self.source.close()

    def _calibrated(self, plain, calibration):
        """``plain`` with its BatchTopK inference threshold fitted to the training rows
        ``calibration`` (once; logged and written to report/batchtopk_threshold.json)."""
        act = getattr(plain, "activation", None)
        if not calibration or not isinstance(act, BatchTopK):
            return plain
        if self._batchtopk_fit is None:
            from torchtitan_clt.models.conversion import describe_batchtopk_fit, fit_batchtopk_threshold

            fit = fit_batchtopk_threshold(plain, calibration)
            self._batchtopk_fit = act.threshold.detach().cpu().clone()  # exact; the JSON rounds
            logger.info(describe_batchtopk_fit(fit))
            (self.run_folder / "report").mkdir(parents=True, exist_ok=True)
            (self.run_folder / "report" / "batchtopk_threshold.json").write_text(json.dumps(fit, indent=1))
        act.threshold.copy_(self._batchtopk_fit.to(act.threshold.device))
        return plain

    def _calibration_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Raw training rows for the JumpReLU conversion of a TopK / BatchTopK export and for the
        BatchTopK inference threshold. Every rank draws them (the stream source's TP all-gather is
        collective); rank 0 uses them."""
        tokens = self.cfg.checkpoint.export_calibration_tokens
        if tokens <= 0 or self.model_args.activation not in ("topk", "batchtopk"):
            return []
        batch = min(tokens, self.cfg.training.batch_size)
        with torch.no_grad():
            return [
                tuple(t.detach().to("cpu", torch.float32) for t in self.source.next_batch(batch))
                for _ in range(-(-tokens // batch))
            ]

    def _gather_plain_model(self):
        """A single-device copy of the (possibly sharded) model on rank 0; None elsewhere."""
        if not dist.is_initialized() or self.parallel_dims.world_size == 1:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.rank != 0:
            return None
        plain = self.spec.build_fn(self.model_args)
        plain.load_state_dict(sd)
        return plain


def _autocast_dtype(cfg: JobConfig, device: torch.device):
    mp = cfg.training.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    init_logger()
    try:
        cfg = load_config(argv)
        trainer = Trainer(cfg)
        trainer.train()
    except InputError as e:  # exit codes: tools/exit_codes.py
        logger.error(f"Input error: {e}")
        return 2
    except ConfigError as e:
        logger.error(f"Config error: {e}")
        return 2
    except TrainingError as e:
        logger.error(str(e))
        return 3
    except Preempted as e:
        logger.warning(str(e))
        return 75
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if code == 75:  # preempted, checkpoint written: skip the interpreter's slow teardown
        exit_now(code)
    sys.exit(code)
