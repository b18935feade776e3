"""The trainer: build the parts, run the loop, finish.

text -> tokens -> LLM activations -> shuffle buffer -> batch -> dictionary -> loss -> step.
Run through ``./run_train.sh`` (torchrun), or ``python -m torchtitan_clt.train`` in one process.
The builders are in ``trainer/build.py``, one step in ``trainer/step.py``, what follows the loop
in ``trainer/finish.py``.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from torchtitan_clt import kernels
from torchtitan_clt.components.lr_scheduler import build_lr_scheduler
from torchtitan_clt.components.optimizer import build_optimizer
from torchtitan_clt.config import ConfigError, InputError, JobConfig, help_text, load_config
from torchtitan_clt.distributed.loss import build_loss_fn_for_mesh
from torchtitan_clt.distributed.tensor_parallel import tp_group_of
from torchtitan_clt.distributed.tp_code import is_code_layout
from torchtitan_clt.distributed.utils import check_config_consistent, destroy, init_distributed
from torchtitan_clt.errors import TrainingError
from torchtitan_clt.metrics.logger import MetricsLogger
from torchtitan_clt.metrics.training import DeadFeatureTracker
from torchtitan_clt.models.losses import dead_after_tokens_of
from torchtitan_clt.tools.logging import init_logger, logger
from torchtitan_clt.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_clt.tools.signals import Preempted, exit_now, stop_and_save, stop_on_signals
from torchtitan_clt.tools.utils import device_from_config, set_determinism
from torchtitan_clt.trainer import build, finish
from torchtitan_clt.trainer.step import StepStats, TrainStep

__all__ = ["Trainer", "TrainState", "TrainingError", "main"]


class TrainState:
    """The trainer's own progress, checkpointed like everything else."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.wandb_run_id = ""  # metrics.wandb: a resumed run continues the same WandB run

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.tokens = int(sd["tokens"])
        self.wandb_run_id = str(sd.get("wandb_run_id", ""))  # absent from older checkpoints


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.spec, build_source_fn = build.check_names(cfg)  # before anything expensive
        self.parallel_dims = pd = init_distributed(cfg)
        check_config_consistent(cfg)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = device_from_config(cfg)
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        kernels.configure_from_job(cfg.kernels)
        self.run_folder = build.make_run_folder(cfg, self.rank)
        self.micro_batch = build.micro_batch_size(cfg, pd)

        self.source = build.build_source(cfg, build_source_fn, pd, self.device)
        self.model_args = build.model_args_for(cfg, self.source)
        self.model, self.decoder_constraint = build.build_model(
            cfg, self.spec, self.model_args, pd, self.device
        )
        finish.check_whole_copy_fits(cfg, self.model, self.model_args, pd.world_size)
        self.optimizers = build_optimizer(self.model, cfg.optimizer)
        self.lr_schedulers = build_lr_scheduler(self.optimizers, cfg.lr_scheduler, cfg.training.steps)
        self.train_state = TrainState()
        dp_mesh = pd.get_optional_mesh("dp")
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None else None
        self.dead = DeadFeatureTracker(
            self.model_args.n_layers,
            cfg.model.features_per_layer,
            dead_after_tokens_of(cfg),
            device=self.device,
            group=self.dp_group,
        )
        self.step_fn = TrainStep(
            model=self.model,
            forward=torch.compile(self.model.forward_std) if cfg.training.compile else self.model.forward_std,
            loss_fn=build_loss_fn_for_mesh(cfg.loss, pd, dead_features=self.dead),  # AuxK reads dead_mask()
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            source=self.source,
            dead=self.dead,
            decoder_constraint=self.decoder_constraint,
            micro_batch=self.micro_batch,
            grad_accum_steps=cfg.training.grad_accum_steps,
            max_norm=cfg.training.max_norm,
            device=self.device,
            autocast_dtype=build.autocast_dtype(cfg, self.device),
            guard=build.build_nonfinite_guard(cfg, self.device, self.optimizers, self.source),
        )
        self.checkpointer = build.build_checkpointer(
            self.run_folder,
            cfg,
            {
                "model": self.model,
                "optimizer": self.optimizers,
                "lr_scheduler": self.lr_schedulers,
                "data": self.source,
                "train_state": self.train_state,
                "dead_features": self.dead,
            },
        )
        if self.checkpointer is not None and self.step_fn.guard is not None:
            self.step_fn.guard.checkpoints = self.checkpointer.folder
        if self.checkpointer is not None and self.checkpointer.load() is not None:
            logger.info(f"Resumed from step {self.train_state.step} ({self.train_state.tokens} tokens)")
        if self.train_state.step == 0:
            build.standardize(cfg, self.model, self.source, self.micro_batch, pd, self.dp_group)
        if is_code_layout(self.model):  # each rank reads, and the data path moves, its columns of y
            group = tp_group_of(self.model)
            how = (
                "scattered by the data path"
                if self.source.deliver_target_columns(group)
                else "sliced from whole rows"
            )
            logger.info(
                f"data: y as this rank's {self.model_args.d_out // dist.get_world_size(group)} of {self.model_args.d_out} columns ({how})"
            )
            self.step_fn.y_columns = group
        self.evaluator = None
        # From the shards every rank evaluates (metrics/sharded_eval.py); else rank 0 a gathered copy.
        self.eval_sharded = finish.eval_wanted(cfg) and finish.eval_from_shards(self.model, self.model_args)
        if finish.eval_wanted(cfg) and (self.rank == 0 or self.eval_sharded):
            from torchtitan_clt.metrics.evaluator import build_evaluator

            self.evaluator = build_evaluator(cfg, self.device, llm=self.source.llm)  # None: no LLM
        ts = self.train_state
        if cfg.metrics.wandb:
            from torchtitan_clt.metrics.wandb_sink import agree_run_id

            ts.wandb_run_id = agree_run_id(ts.wandb_run_id)
        self.metrics = MetricsLogger(
            self.run_folder,
            cfg,
            self.rank,
            device=self.device,
            start_step=ts.step,
            start_tokens=ts.tokens,
            wandb_run_id=ts.wandb_run_id,
        )

    def train_step(self, step: int, collect: bool = False) -> StepStats:
        """One optimizer step over ``grad_accum_steps`` micro-batches (``trainer/step.py``)."""
        return self.step_fn(step, collect)

    def train(self) -> dict:
        cfg, ts = self.cfg, self.train_state
        t = cfg.training
        last: dict = {}
        logger.info(
            f"Training {t.steps} steps of {t.batch_size} tokens (micro-batch {self.micro_batch} × "
            f"{t.grad_accum_steps} accumulation × {self.parallel_dims.dp_degree} data-parallel)"
        )
        t_window, data_wait_s = time.perf_counter(), 0.0
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
                stats = self.train_step(step, collect=log_now)
                ts.tokens += t.batch_size
                data_wait_s += stats.data_wait_s
                if log_now:
                    elapsed = time.perf_counter() - t_window
                    last = self._log(step, stats, data_wait_s / max(elapsed, 1e-9))
                    t_window, data_wait_s = time.perf_counter(), 0.0
                if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < t.steps:
                    self._check_finite(step)
                    self._evaluate(step, None if self.eval_sharded else self._gather(), open_loop=False)
                if self.checkpointer is not None:
                    if self.checkpointer.should_save(step, step == t.steps):
                        self._check_finite(step)  # nothing non-finite is written
                    self.checkpointer.save(step, last_step=step == t.steps)
                if profiler is not None:
                    profiler.step()
                if mem_snapshot is not None:
                    mem_snapshot.step()
                if (signum := stop.agreed()) and step < t.steps:  # SIGTERM / SIGUSR1 on any rank
                    self._check_finite(step)
                    stop_and_save(self, step, stop, signum)
        self._check_finite(ts.step)
        self._finish()
        return last

    def _check_finite(self, step: int) -> None:
        """Raise for any non-finite step still unread (``training.nonfinite_check = "deferred"``)."""
        if self.step_fn.guard is not None:
            self.step_fn.guard.check(step, flush=True)

    def _log(self, step: int, stats: StepStats, data_wait_frac: float) -> dict:
        scalars = {"loss": stats.loss, **stats.terms}
        l0_layers = torch.stack(stats.l0).mean(0)  # [L]
        if self.dp_group is not None:
            for v in (*scalars.values(), l0_layers):
                dist.all_reduce(v, group=self.dp_group)
                v /= self.parallel_dims.dp_degree
        fvu_layers = stats.fvu.compute(
            self.dp_group, self.step_fn.y_columns
        )  # [L], exact over all ranks' rows
        loss = scalars.pop("loss")
        metrics = {
            "tokens": self.train_state.tokens,
            "loss": float(loss),
            "terms": {k: float(v) for k, v in scalars.items()},
            "fvu_per_layer": [round(float(v), 5) for v in fvu_layers],
            "l0_per_layer": [round(float(v), 3) for v in l0_layers],
            "dead_frac": float(self.dead.dead_fraction()),
            "lr": self.lr_schedulers.get_last_lr(),
            "grad_norm": float(stats.grad_norm),
            "data_wait_frac": data_wait_frac,
        }
        return self.metrics.log(step, metrics) or metrics

    def _gather(self):
        """The model on one device, on rank 0 (None elsewhere); every rank must call it."""
        return finish.gather_plain_model(
            self.model, self.spec, self.model_args, self.parallel_dims.world_size
        )

    def _evaluate(self, step: int, plain, open_loop: bool) -> dict | None:
        """Replacement-model evaluation on held-out text: of the sharded model on every rank
        (``eval_sharded``; rank 0 logs), else once on rank 0 of the gathered ``plain``."""
        result = None
        model = self.model if self.eval_sharded else plain
        if model is not None and self.evaluator is not None:
            model = model if self.eval_sharded else model.to(self.device)
            result = self.evaluator.run(model, step, open_loop=open_loop)
            if self.rank == 0:
                self.metrics.log(step, self.evaluator.log_metrics(result))
        if dist.is_initialized():
            dist.barrier()
        return result

    def _finish(self) -> None:
        cfg = self.cfg
        if self.checkpointer is not None:  # the last save's host copy is freed once it is written
            self.checkpointer.wait()
        wants_eval = finish.eval_wanted(cfg)
        exports = cfg.checkpoint.export or cfg.checkpoint.export_circuit_tracer
        features = cfg.eval.feature_examples_tokens > 0
        # Training rows for the inference threshold of BatchTopK and the circuit-tracer conversion.
        uses = wants_eval or cfg.checkpoint.export or features
        need = cfg.checkpoint.export_circuit_tracer or (self.model_args.activation == "batchtopk" and uses)
        calibration = (
            finish.calibration_batches(cfg, self.model_args, self.source, self.step_fn.y_columns)
            if need
            else []
        )
        # The source's buffer is done with (its rows can be most of a rank's host memory); its LLM
        # stays for the evaluation and the feature pass.
        llm = self.source.llm
        self.source.close()
        # On a mesh the exports stream from the shards, first: nothing is gathered whole for them.
        streamed = exports and finish.exports_streamed(cfg, self.model, self.model_args, calibration)
        # Every rank; a BatchTopK threshold is fitted into the shards first (the shards' evaluation
        # and streamed exports read it, and a copy gathered after carries it).
        fit_in_shards = streamed or (self.eval_sharded and self.model_args.activation == "batchtopk")
        if fit_in_shards:
            finish.fit_batchtopk_sharded(self.model, calibration, self.run_folder)
        if streamed:
            finish.export_all(cfg, self.model, self.run_folder, calibration)
        ws = self.parallel_dims.world_size
        features_over_ranks = streamed and finish.features_from_shards(cfg, self.model, self.model_args, ws)
        whole = (wants_eval and not self.eval_sharded) or (features and not features_over_ranks)
        whole = whole or (exports and not streamed)
        plain = self._gather() if whole else None  # carries a threshold fitted above
        if not fit_in_shards:
            plain = finish.fit_batchtopk(plain, calibration, self.run_folder)
        result = self._evaluate(self.train_state.step, plain, cfg.eval.open_loop) if wants_eval else None
        if self.rank == 0:
            finish.write_run_report(self.run_folder, result)
        if self.checkpointer is not None:
            self.checkpointer.close()
        if plain is not None:  # rank 0
            if exports and not streamed:
                finish.export_all(cfg, plain, self.run_folder, calibration)
            if features and not features_over_ranks:
                finish.feature_pass(cfg, plain, self.run_folder, llm)
        if features_over_ranks:  # every rank, its share of the features (after rank 0's exports)
            finish.feature_pass(cfg, None, self.run_folder, llm, over_ranks=True)
        if cfg.metrics.wandb:  # the plots and, when asked, the exports and model card (a Hub push's files)
            from torchtitan_clt.checkpoint.hub import plan_upload

            self.metrics.log_report(plan_upload)
        self.metrics.close()


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
        destroy()  # the watchdog thread too: left running, it can abort the exit (SIGABRT)
    return 0


if __name__ == "__main__":
    code = main()
    if code == 75:  # preempted, checkpoint written: skip the interpreter's slow teardown
        exit_now(code)
    sys.exit(code)
