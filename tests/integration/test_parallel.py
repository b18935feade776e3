"""The trainer on a gloo mesh trains exactly like one process, on the sparse path.

A CLT with JumpReLU, TopK, and BatchTopK per layer and across layers is trained for 20 steps by
``run_train.sh`` (torchrun) with 1 process, 2 (dp), 2 (tp) and 4 (dp_shard 2 × tp 2) processes on
the same global batches. The logged loss of every step and the exported final weights must agree
with one process on the sparse path and with one process on the dense path
(``kernels.sparse_density_threshold = 0``). Every rank of every sparse run must have run the
sparse step (TopK / BatchTopK: ``SparseEncode``; JumpReLU: the sparse decoder ``decode_entries``), counted
by a spy this module installs in each worker (it is the run's ``job.custom_import``); the same spy
checks that FSDP gathered the parameters and reduce-scattered the gradients through the
shared-memory segment of ``distributed/shm_comm.py`` (or, where this host cannot give one, the
gloo point-to-point rings of ``distributed/ring_comm.py``) and that no other layout did.

Tolerance, from fp32 reordering only (tp partial sums and the dp gradient average add in another
order than one process; measured differences are ~1e-7): losses within 1e-5 relative, final
weights within 1e-4 absolute after 20 AdamW steps. A missing, doubled or misplaced reduction is off
by O(1e-1) or more from the first steps on.

The data is the ``synthetic`` source drawn as one global batch per step and sliced by data-parallel
rank (``dp_sliced_synthetic`` below, registered through ``job.custom_import``), so every layout
sees the same rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchtitan_clt.data.source import ActivationSource

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
STEPS = 20

BASE = [
    "--config", "train_configs/debug_model.toml",
    "--job.custom_import", str(THIS),
    "--data.source=dp_sliced_synthetic",
    "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16",
    "--model.name=clt", "--model.features_per_layer=32", "--model.k=4",
    "--model.jumprelu_threshold_init=0.05", "--model.jumprelu_bandwidth=0.5",
    f"--training.steps={STEPS}", "--training.batch_size=32", "--training.device=cpu",
    "--optimizer.lr=2e-2", "--lr_scheduler.warmup_steps=0", "--lr_scheduler.decay_ratio=0",
    "--loss.lambda_sparsity=3e-3", "--loss.lambda_warmup_steps=0",
    "--standardize.inputs=none", "--standardize.targets=none",
    "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.enable=false", "--checkpoint.export=true",
    # the end-of-run BatchTopK threshold fit reads rank 0's rows, which differ between layouts
    "--checkpoint.export_calibration_tokens=0",
]  # fmt: skip

ACTIVATIONS = {
    "jumprelu": ["--model.activation=jumprelu"],
    "topk": ["--model.activation=topk", "--loss.sparsity=none"],
    "batchtopk_layer": [
        "--model.activation=batchtopk",
        "--model.batchtopk_scope=layer",
        "--loss.sparsity=none",
    ],
    "batchtopk_all": ["--model.activation=batchtopk", "--model.batchtopk_scope=all", "--loss.sparsity=none"],
}
# k / F = 4 / 16 per tp rank: the sparse step is taken below this density threshold, never above 0.
SPARSE = ["--kernels.sparse_density_threshold=1.0"]
DENSE = ["--kernels.sparse_density_threshold=0.0"]

LAYOUTS = {  # name: (NGPU, overrides)
    "dp2": (2, ["--parallelism.dp_shard=2", "--parallelism.tp=1"]),
    "tp2": (2, ["--parallelism.dp_shard=1", "--parallelism.tp=2"]),
    "dp2_tp2": (4, ["--parallelism.dp_shard=2", "--parallelism.tp=2"]),
}


def run_training(folder: Path, name: str, ngpu: int, overrides: list[str], env_extra=None) -> Path:
    env = dict(os.environ, NGPU=str(ngpu), OMP_NUM_THREADS="1", PYTHON=sys.executable, **(env_extra or {}))
    env[SPY_ENV] = str(folder / name)
    cmd = [
        "bash",
        str(ROOT / "run_train.sh"),
        f"--job.dump_folder={folder}",
        f"--job.name={name}",
        *overrides,
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return folder / name


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


def assert_same_training(run: Path, ref: Path, steps: int = STEPS) -> None:
    got, want = losses(run), losses(ref)
    assert len(got) == len(want) == steps
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: loss {a} vs one process {b}"
    w, w_ref = weights(run), weights(ref)
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        diff = (w[k].float() - w_ref[k].float()).abs().max().item()
        assert diff <= 1e-4, f"{k}: max |Δ| {diff} after {STEPS} steps"


def reference_run(tmp_path_factory, activation: str, path: str = "sparse") -> Path:
    """The one-process run, made once per pytest session (test_multinode.py reuses it)."""
    folder = tmp_path_factory.getbasetemp() / "parallel_references"
    name = f"ref_{activation}" + ("" if path == "sparse" else f"_{path}")
    run = folder / name
    if not (run / "export" / "model.safetensors").is_file():
        folder.mkdir(exist_ok=True)
        run_training(
            folder, name, 1, BASE + ACTIVATIONS[activation] + (SPARSE if path == "sparse" else DENSE)
        )
    return run


def sparse_calls(run: Path, ngpu: int) -> list[dict]:
    """What the spy counted on each rank (written when the worker exits)."""
    return [json.loads((run / f"spy_rank{r}.json").read_text()) for r in range(ngpu)]


def assert_took_sparse_path(run: Path, ngpu: int, activation: str, fsdp: bool = False) -> None:
    key = "sparse_decode" if activation == "jumprelu" else "sparse_encode"
    for rank, calls in enumerate(sparse_calls(run, ngpu)):
        assert calls[key] >= STEPS, f"rank {rank} of {run.name}: {calls} (sparse path not taken)"
        # FSDP on gloo gathers the parameters and reduce-scatters the gradients through the
        # shared segment (or the rings) at least once per step each; nothing else does.
        for op in ("all_gather", "reduce_scatter"):
            n = calls[f"shm_{op}"] + calls[f"ring_{op}"]
            assert n >= STEPS if fsdp else n == 0, f"rank {rank} of {run.name}: {calls} ({op})"
        if activation != "jumprelu":
            assert calls["activation_forward"] == 0, f"rank {rank}: dense selection ran {calls}"
            assert calls["dense_acts"] == 0, f"rank {rank}: the sparse step built dense acts {calls}"


@pytest.mark.slow
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_sparse_path_matches_dense_path(tmp_path_factory, activation):
    sparse = reference_run(tmp_path_factory, activation)
    dense = reference_run(tmp_path_factory, activation, "dense")
    assert_took_sparse_path(sparse, 1, activation)
    dense_calls = sparse_calls(dense, 1)[0]
    assert dense_calls["sparse_encode"] == 0 and dense_calls["sparse_decode"] == 0, dense_calls
    # The reference itself must have trained, or equal losses would prove nothing.
    ref_losses = losses(sparse)
    assert sum(ref_losses[-5:]) < 0.97 * sum(ref_losses[:5])
    assert_same_training(sparse, dense)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_layout_matches_one_process(tmp_path, tmp_path_factory, layout, activation):
    ngpu, mesh = LAYOUTS[layout]
    run = run_training(
        tmp_path, f"{layout}_{activation}", ngpu, BASE + ACTIVATIONS[activation] + SPARSE + mesh
    )
    assert_took_sparse_path(run, ngpu, activation, fsdp="--parallelism.dp_shard=2" in mesh)
    assert_same_training(run, reference_run(tmp_path_factory, activation))
    assert_same_training(run, reference_run(tmp_path_factory, activation, "dense"))


# ---------------------------------------------------------------------------------------------
# ``job.custom_import`` side: a synthetic source whose global batch does not depend on dp degree.


def _register_source() -> None:
    from torchtitan_clt.protocols.registry import data_source_registry

    if "dp_sliced_synthetic" in data_source_registry.names():
        return

    def build(job_config, ctx):
        import dataclasses

        from torchtitan_clt.data.synthetic import SyntheticSource

        d = job_config.data
        # Every rank draws the global stream (as data-parallel rank 0 of 1) and keeps its rows.
        inner = SyntheticSource(
            d.synthetic_n_layers, d.synthetic_d_model, dataclasses.replace(ctx, dp_rank=0, dp_degree=1)
        )
        return _Sliced(inner, ctx.dp_rank, ctx.dp_degree)

    data_source_registry.register("dp_sliced_synthetic", build)


class _Sliced(ActivationSource):
    def __init__(self, inner, rank: int, degree: int):
        self.inner, self.rank, self.degree = inner, rank, degree
        for k in ("n_layers", "d_in", "d_out", "layers", "model_name", "hook_in", "hook_out"):
            setattr(self, k, getattr(inner, k))

    def next_batch(self, batch_size: int):
        x, y = self.inner.next_batch(batch_size * self.degree)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[rows], y[rows]

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)

    def close(self):
        self.inner.close()

    def describe(self):
        return self.inner.describe()


SPY_ENV = "TCLT_TEST_SPY_DIR"


def _install_spy() -> None:
    """Count, in this worker, the sparse steps, the sparse JumpReLU decodes, the dense
    TopK / BatchTopK activations and dense tensors built from the sparse code; written to ``$TCLT_TEST_SPY_DIR/spy_rank{r}.json`` at exit."""
    import atexit

    from torchtitan_clt.distributed import ring_comm, shm_comm
    from torchtitan_clt.kernels import sparse_step
    from torchtitan_clt.models import activations
    from torchtitan_clt.models.clt import model as clt_model
    from torchtitan_clt.protocols import transcoder

    counts = {
        "sparse_encode": 0,
        "sparse_decode": 0,
        "activation_forward": 0,
        "dense_acts": 0,
        "ring_all_gather": 0,
        "ring_reduce_scatter": 0,
        "shm_all_gather": 0,
        "shm_reduce_scatter": 0,
    }

    def counted(fn, key):
        def run(*a, **kw):
            counts[key] += 1
            return fn(*a, **kw)

        return run

    sparse_step.SparseEncode.forward = staticmethod(
        counted(sparse_step.SparseEncode.forward, "sparse_encode")
    )
    clt_model.decode_entries = counted(clt_model.decode_entries, "sparse_decode")
    activations._Selecting.forward = counted(activations._Selecting.forward, "activation_forward")
    transcoder.SparseCode.to_dense = counted(transcoder.SparseCode.to_dense, "dense_acts")
    ring_comm.ring_all_gather = counted(ring_comm.ring_all_gather, "ring_all_gather")
    ring_comm.ring_reduce_scatter = counted(ring_comm.ring_reduce_scatter, "ring_reduce_scatter")

    def counted_shared(cls, key, buffer):  # a call on the segment (not its fallback)
        call = cls.__call__

        def run(self, *a, **kw):
            counts[key] += self.shared.holds(kw[buffer], kw["group"])
            return call(self, *a, **kw)

        cls.__call__ = run

    counted_shared(shm_comm.ShmAllGather, "shm_all_gather", "output_tensor")
    counted_shared(shm_comm.ShmReduceScatter, "shm_reduce_scatter", "input_tensor")

    def write() -> None:
        rank = os.environ.get("RANK", "0")
        Path(os.environ[SPY_ENV], f"spy_rank{rank}.json").write_text(json.dumps(counts))

    atexit.register(write)


if __name__ != "__main__" and not __name__.startswith("test_") and "torchtitan_clt_custom" in __name__:
    _register_source()
    if os.environ.get(SPY_ENV):
        _install_spy()
