"""BatchTopK under gradient accumulation trains exactly like one forward of the whole batch.

A BatchTopK CLT (scope ``layer``, and ``all`` with the pre-activation loss, which reads the
tracked threshold) is trained by ``run_train.sh`` with ``training.grad_accum_steps = 4`` on one
process, dp2 and tp2 (gloo), and with ``grad_accum_steps = 1`` on one process, on the same global
batches; a Matryoshka CLT (its selection runs on dense activations) on one process.
The logged losses must agree within 1e-5 relative at every step and the exported final weights
(the tracked threshold included) within 1e-4: the step selects the (k·B)-th largest pre-activation
over all its micro-batches (``kernels/step_selection.py``). A selection per micro-batch (the k·B/4
largest of each quarter) keeps other entries and is off by far more from the first steps on; the
test checks that too, so it can fail.

The data: every run reads one stream of rows in one order (``step_stream`` below, registered
through ``job.custom_import``); a call takes the next ``batch_size × dp`` rows and keeps this
rank's slice, so four micro-batches of a step hold the rows one batch of the step would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

THIS = Path(__file__).resolve()
sys.path.insert(0, str(THIS.parent))  # test_parallel, also when imported by job.custom_import

from test_parallel import assert_same_training, losses, run_training  # noqa: E402

from torchtitan_clt.data.source import ActivationSource  # noqa: E402

STEPS = 12
BLOCK = 32  # rows the stream draws at a time (the global batch)

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(THIS),
    "--data.source=step_stream",
    "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
    "--model.name=clt", "--model.activation=batchtopk", "--model.features_per_layer=32", "--model.k=4",
    f"--training.steps={STEPS}", f"--training.batch_size={BLOCK}", "--training.device=cpu",
    "--optimizer.lr=2e-2", "--lr_scheduler.warmup_steps=0", "--lr_scheduler.decay_ratio=0",
    "--loss.sparsity=none", "--loss.lambda_warmup_steps=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.enable=false", "--checkpoint.export=true",
    "--checkpoint.export_calibration_tokens=0",  # the end-of-run fit reads rank 0's rows only
    "--kernels.sparse_density_threshold=1.0",  # the sparse step (k / F = 4 / 16 per tp rank)
]  # fmt: skip
SCOPES = {
    "layer": ["--model.batchtopk_scope=layer"],
    "all_preact": ["--model.batchtopk_scope=all", "--loss.lambda_preact=1e-2"],
}
ACCUM4 = ["--training.grad_accum_steps=4"]
LAYOUTS = {  # name: (processes, overrides)
    "one": (1, []),
    "dp2": (2, ["--parallelism.dp_shard=2", "--parallelism.tp=1"]),
    "tp2": (2, ["--parallelism.dp_shard=1", "--parallelism.tp=2"]),
}


def _max_loss_gap(run: Path, ref: Path) -> float:
    return max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses(run), losses(ref)))


@pytest.mark.slow
@pytest.mark.parametrize("scope", list(SCOPES))
def test_accumulated_batchtopk_matches_one_batch(tmp_path, scope):
    ref = run_training(tmp_path, f"ref_{scope}", 1, BASE + SCOPES[scope])
    want = losses(ref)
    assert sum(want[-3:]) < 0.97 * sum(want[:3])  # the reference trained
    for layout, (n, mesh) in LAYOUTS.items():
        run = run_training(tmp_path, f"{layout}_{scope}", n, BASE + SCOPES[scope] + ACCUM4 + mesh)
        assert_same_training(run, ref, STEPS)
    # The control: selecting per micro-batch (a StepSelection of one micro-batch's rows) trains
    # something else, by far more than the tolerance.
    ctl = run_training(tmp_path, f"per_micro_{scope}", 1, BASE + SCOPES[scope] + ACCUM4, {PER_MICRO_ENV: "1"})
    assert _max_loss_gap(ctl, ref) > 1e-3


@pytest.mark.slow
def test_accumulated_batchtopk_matryoshka_matches_one_batch(tmp_path):
    """The Matryoshka CLT selects on its dense activations (``BatchTopK.forward``), not in the
    sparse step: the fixed ids take that path too."""
    family = ["--model.name=matryoshka_clt", "--model.matryoshka_prefixes=[8,32]"] + SCOPES["layer"]
    ref = run_training(tmp_path, "ref_matryoshka", 1, BASE + family)
    assert_same_training(run_training(tmp_path, "accum4_matryoshka", 1, BASE + family + ACCUM4), ref, STEPS)


# ---------------------------------------------------------------------------------------------
# ``job.custom_import`` side.

PER_MICRO_ENV = "TCLT_TEST_SELECT_PER_MICRO_BATCH"


class _StepStream(ActivationSource):
    """One stream of rows, in one order whatever the micro-batch size and dp degree."""

    def __init__(self, inner, rank: int, degree: int):
        self.inner, self.rank, self.degree = inner, rank, degree
        for k in ("n_layers", "d_in", "d_out", "layers", "model_name", "hook_in", "hook_out"):
            setattr(self, k, getattr(inner, k))
        self._x = self._y = None

    def next_batch(self, batch_size: int):
        need = batch_size * self.degree
        while self._x is None or self._x.shape[0] < need:
            x, y = self.inner.next_batch(BLOCK)
            self._x = x if self._x is None else torch.cat([self._x, x])
            self._y = y if self._y is None else torch.cat([self._y, y])
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        x, y = self._x[:need][rows], self._y[:need][rows]
        self._x, self._y = self._x[need:], self._y[need:]
        return x, y

    def describe(self):
        return self.inner.describe()


def _register() -> None:
    from torchtitan_clt.protocols.registry import data_source_registry

    if "step_stream" in data_source_registry.names():
        return

    def build(job_config, ctx):
        import dataclasses

        from torchtitan_clt.data.synthetic import SyntheticSource

        d = job_config.data
        inner = SyntheticSource(
            d.synthetic_n_layers, d.synthetic_d_model, dataclasses.replace(ctx, dp_rank=0, dp_degree=1)
        )
        return _StepStream(inner, ctx.dp_rank, ctx.dp_degree)

    data_source_registry.register("step_stream", build)


def _select_per_micro_batch() -> None:
    """The control: each micro-batch selects its own k·b (what accumulation did before issue 31)."""
    from torchtitan_clt.trainer import step

    def per_micro(self, act, sel, batches):
        return _PerMicro(act, sel, batches, self)

    step.TrainStep._select_over_step = per_micro


class _PerMicro:
    def __init__(self, act, sel, batches, trainer_step):
        from torchtitan_clt.kernels.step_selection import StepSelection

        self.chosen = []
        g = trainer_step.model.mesh_groups
        for x, _ in batches:
            s = StepSelection(sel, x.shape[0], g.batch, g.batch_scale)
            with act.collecting(s), torch.no_grad():
                trainer_step.model.encode(x)
            s.finish()
            self.chosen.append(s)
        act.observe_step(self.chosen[-1])

    def ids(self, j):
        return self.chosen[j].ids(0)


if "torchtitan_clt_custom" in __name__:
    import os

    _register()
    if os.environ.get(PER_MICRO_ENV):
        _select_per_micro_batch()
