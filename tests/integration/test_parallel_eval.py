"""The held-out evaluation from the sharded model (issue 26, ``metrics/sharded_eval.py``), on gloo
CPU ranks: tp=2 ``features`` layout, tp=2 ``code`` layout, dp_shard 2 × tp 2 with FSDP2, and
FSDP2 alone (dp_shard 2).

For a CLT with a skip path and a PLT, each with JumpReLU, BatchTopK (its inference threshold) and
TopK (the global top k over the shards), every rank runs the trainer's ``Evaluator`` on the sharded
model; the reference is the same evaluator, in the same process, on the plain copy that today's path
gathers (``finish.gather_plain_model``) of the same weights, on the same held-out tokens. The
metrics must agree within 1e-5 relative (fp32 summation order: partial sums over ranks; 1e-4 for
CE recovered, a ratio over an ablation's CE gap) and be the same on every rank. A spy on ``gather_plain_model`` shows the sharded run never gathers, and a
``TorchDispatchMode`` records the shape of every tensor an op made during it: none is the whole
shape of a weight matrix the layout shards (the gathered path's ops do see them, on rank 0).
Then the trainer: ``run_train.sh`` at tp=2 evaluates every ``eval.every`` steps and at the end from
the shards, and never gathers (``test_trainer_evaluates_from_the_shards``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
LAYERS, D, F = [0, 1, 3], 64, 32
CASES = [(fam, act) for fam in ("clt", "plt") for act in ("jumprelu", "batchtopk", "topk")]


def _reference(family: str, act: str):
    """A trained-like plain model: weights that move the logits, a skip path (CLT), thresholds,
    standardization."""
    from torchtitan_clt.protocols import model_registry
    from torchtitan_clt.protocols.transcoder import TranscoderArgs

    args = TranscoderArgs(
        family=family, n_layers=len(LAYERS), d_in=D, d_out=D, features_per_layer=F, activation=act,
        layers=list(LAYERS), hook_in="mlp_in", k=3, jumprelu_threshold_init=0.05,
        skip_connection=family == "clt",
    )  # fmt: skip
    m = model_registry.get(family).build_fn(args)
    m.init_weights(1)
    g = torch.Generator().manual_seed(5)
    L = len(LAYERS)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
        m.b_enc.copy_(0.2 * torch.randn(m.b_enc.shape, generator=g))
        m.b_dec.copy_(0.1 * torch.randn(m.b_dec.shape, generator=g))
        if m.W_skip is not None:
            m.W_skip.copy_(0.2 * torch.randn(m.W_skip.shape, generator=g))
        if act == "jumprelu":
            m.activation.log_threshold.copy_((0.1 * torch.rand(L, F, generator=g) + 0.02).log())
        if act == "batchtopk":
            m.activation.threshold.copy_(0.3 + 0.1 * torch.rand(L, generator=g))
    m.set_standardization(
        0.1 * torch.randn(L, D, generator=g),
        torch.rand(L, D, generator=g) + 0.5,
        0.1 * torch.randn(L, D, generator=g),
        torch.rand(L, D, generator=g) + 0.5,
    )
    return args, m


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """The shape of every tensor an op made inside the block (views, which allocate nothing, and
    a DTensor's global shape aside: what this rank holds is its local tensor)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, ...]] = set()
        self.ops: dict[tuple[int, ...], str] = {}  # the first op that met each shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, DTensor):
                t = t._local_tensor
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
                self.ops.setdefault(tuple(t.shape), str(func))
        return out


def _flat(r: dict) -> dict[str, float]:
    """Every number of an evaluator result, by path."""
    out = {}

    def walk(v, key):
        if isinstance(v, dict):
            for k, w in v.items():
                walk(w, f"{key}.{k}")
        elif isinstance(v, list):
            for i, w in enumerate(v):
                walk(w, f"{key}[{i}]")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)

    walk(r, "")
    return out


def _tol(key: str) -> float:
    """1e-5 relative; CE recovered divides by an ablation's CE gap (a layer's can be ~1e-3), which
    amplifies the fp32 reordering of the CEs it is made of: 1e-4."""
    return 1e-4 if "recovered" in key else 1e-5


def _worker(rank: int, world: int, tmp: str, layout: str) -> None:
    import torch.distributed as dist
    from helpers import load_reference_
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_clt.config import JobConfig
    from torchtitan_clt.distributed.fsdp import apply_fsdp
    from torchtitan_clt.distributed.tensor_parallel import apply_tp, placement_for
    from torchtitan_clt.distributed.tp_code import apply_tp_code
    from torchtitan_clt.metrics import sharded_eval
    from torchtitan_clt.metrics.evaluator import Evaluator
    from torchtitan_clt.protocols import model_registry
    from torchtitan_clt.protocols.transcoder import MeshGroups
    from torchtitan_clt.trainer import finish

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    try:
        dp = 2 if layout.startswith("dp2") else 1
        tp = 1 if layout == "dp2" else 2
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        cfg = JobConfig()
        cfg.data.model_path, cfg.data.model_dtype, cfg.data.seq_len = (
            str(ASSETS / "tiny_llama"),
            "float32",
            12,
        )
        cfg.eval.dataset, cfg.eval.tokens, cfg.eval.batch_size = str(ASSETS / "tiny_text.txt"), 36, 3
        ev = Evaluator(cfg, "cpu")  # every rank: its own LLM, the same held-out tokens
        if layout == "tp2":  # the feature statistics in blocks of 10 rows, chunked inside them
            from torchtitan_clt.metrics import splice

            splice.DEFAULT_CHUNK_ELEMENTS = len(LAYERS) * D * 10
        gathers = [0]
        gather = finish.gather_plain_model

        def spy(*a, **k):
            gathers[0] += 1
            return gather(*a, **k)

        finish.gather_plain_model = spy
        report = {}
        for family, act in CASES:
            spec = model_registry.get(family)
            args, ref = _reference(family, act)
            with torch.device("meta"):
                model = spec.build_fn(args)
            if layout == "code":
                apply_tp_code(model, mesh["tp"], spec.tp_code_plan)
            elif tp > 1:
                apply_tp(model, mesh["tp"], spec.tp_plan)
            model.set_mesh_groups(
                MeshGroups(
                    batch=dist.group.WORLD, features=mesh["tp"].get_group() if tp > 1 else None,
                    batch_scale=dp, feature_shards=tp, sum_decoder_partials=layout != "code",
                )
            )  # fmt: skip
            if dp > 1:
                apply_fsdp(model, mesh["dp"], None)
            model.to_empty(device="cpu")
            load_reference_(model, ref)
            model.train()
            assert sharded_eval.supported(model) and finish.eval_from_shards(model, args)
            cfg.eval.enable = True  # the pre-training check no longer counts the evaluation
            assert not any("evaluation" in r for r in finish.whole_copy_readers(cfg, model, args))
            n0 = gathers[0]
            with _Shapes() as shapes:
                got = ev.run(model, step=7, open_loop=True)
            assert gathers[0] == n0, "the sharded evaluation gathered the model"
            assert model.training, "the model's mode is restored"
            # The whole shapes of the weight matrices the layout shards: none may appear in an op
            # (per-feature [L, F] vectors are gathered on purpose: the feature statistics).
            plan = spec.tp_code_plan if layout == "code" else spec.tp_plan
            whole = {
                tuple(p.shape)
                for n, p in ref.named_parameters()
                if tp > 1 and p.dim() >= 3 and placement_for(n, plan) is not None
            }
            whole_seen = sorted((s, shapes.ops[s]) for s in whole & shapes.seen)
            # Today's path: the plain copy on rank 0, evaluated by the same evaluator.
            with _Shapes() as shapes_gathered:
                plain = finish.gather_plain_model(model, spec, args, world)
                want = ev.run(plain, step=7, open_loop=True) if rank == 0 else None
            report[f"{family}_{act}"] = {
                "got": _flat(got),
                "want": _flat(want) if want else None,
                "whole_seen": whole_seen,
                "whole_seen_gathered": sorted(whole & shapes_gathered.seen),
            }
            dist.barrier()
        Path(tmp, f"report{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "code", "dp2xtp2", "dp2"])
def test_sharded_evaluation_equals_the_gathered_one(tmp_path, layout):
    from helpers import run_ranks  # here: the trainer imports this module (job.custom_import)

    world = 4 if layout == "dp2xtp2" else 2
    run_ranks(_worker, (world, str(tmp_path), layout), world, timeout_s=400)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(world)]
    for case in reports[0]:
        want = reports[0][case]["want"]
        for r in range(world):
            got = reports[r][case]["got"]
            assert got.keys() == want.keys(), (case, set(got) ^ set(want))
            bad = {
                k: (got[k], want[k])
                for k in want
                if not (math.isnan(want[k]) and math.isnan(got[k]))
                and abs(got[k] - want[k]) > _tol(k) * max(1.0, abs(want[k]))
            }
            assert not bad, (case, r, bad)
            rep = reports[r][case]
            # No op of the sharded evaluation saw a sharded parameter whole; the gathered path
            # does (on rank 0: the check can fail).
            assert rep["whole_seen"] == [], (case, r, rep["whole_seen"])
        if layout != "dp2":  # FSDP alone: the tp shard is the whole model (no tp group)
            assert reports[0][case]["whole_seen_gathered"], case
        # The numbers are not trivial: the replacement moves the logits, features fire.
        assert want[".replacement.closed_loop.kl"] > 1e-4, case
        assert 0 < want[".feature_stats.l0"] < F, case


# --- the trainer: eval.every and the end of run take the sharded path --------------------------
THIS = Path(__file__).resolve()
STEPS = 4
TRAIN = [
    "--config", "train_configs/debug_model.toml", "--job.custom_import", str(THIS),
    "--model.features_per_layer=32", "--model.activation=batchtopk", "--model.k=4",
    f"--training.steps={STEPS}", "--training.batch_size=64", "--standardize.estimate_tokens=256",
    "--data.buffer_tokens=512", "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.interval=2", "--checkpoint.export_calibration_tokens=64",
    "--eval.enable=true", "--eval.every=2", "--eval.tokens=96", "--eval.batch_size=2",
    "--parallelism.tp=2", "--parallelism.dp_shard=1",
    "--checkpoint.export_circuit_tracer=true", "--eval.feature_examples_tokens=96",
]  # fmt: skip


@pytest.mark.slow
def test_trainer_evaluates_from_the_shards(tmp_path):
    """``run_train.sh`` on tp=2 with ``eval.every``, the final evaluation and the feature pass of a BatchTopK CLT
    (its inference threshold fitted into the shards): no rank gathers the model (this module, as
    the run's ``job.custom_import``, makes ``gather_plain_model`` of a sharded model raise), and
    the logged metrics equal the evaluator's on the checkpoint rebuilt in one process (step 2: as
    trained; the end: with the fitted threshold from ``report/batchtopk_threshold.json``)."""
    import os
    import subprocess
    import sys

    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint
    from torchtitan_clt.config import load_config
    from torchtitan_clt.metrics.evaluator import Evaluator

    env = dict(os.environ, NGPU="2", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["MASTER_PORT"] = str(29500 + (os.getpid() + 13) % 1000)
    args = [*TRAIN, f"--job.dump_folder={tmp_path}", "--job.name=run"]
    r = subprocess.run(
        ["bash", str(ROOT / "run_train.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "from the shards" in log and "gathering the whole model" not in log, log[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x for x in rows if "eval_ce_clean" in x}
    assert sorted(evals) == [2, STEPS]

    cfg = load_config(args, check=False)
    ev = Evaluator(cfg, "cpu")
    fit = json.loads((run / "report" / "batchtopk_threshold.json").read_text())
    for step, open_loop in ((2, False), (STEPS, cfg.eval.open_loop)):
        model, _ = load_model_from_checkpoint(run, step=step)
        if step == STEPS:
            with torch.no_grad():
                model.activation.threshold.copy_(torch.tensor(fit["threshold"]))
        want = Evaluator.log_metrics(ev.run(model, step, open_loop=open_loop))
        got = evals[step]
        flat_got = _flat({k: got[k] for k in want})
        for k, v in _flat(want).items():
            assert abs(flat_got[k] - v) <= _tol(k) * max(1.0, abs(v)), (step, k, flat_got[k], v)
    assert evals[STEPS]["eval_ce_replacement"] != evals[2]["eval_ce_replacement"]
    # The feature pass read the circuit-tracer export's halves on the two ranks (nothing gathered).
    summary = json.loads((run / "features" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["features"] == 4 * 32, summary
    assert (
        summary["fired"]
        == len([p for p in (run / "features").glob("*.json") if p.name != "summary.json"])
        > 0
    )


# --- ``job.custom_import`` side: the run may not gather a sharded model -------------------------
def _forbid_gathers() -> None:
    from torchtitan_clt.checkpoint.sharded_export import is_sharded
    from torchtitan_clt.trainer import finish

    gather = finish.gather_plain_model

    def forbidden(model, *a, **kw):
        if is_sharded(model):
            raise RuntimeError("gather_plain_model: the model was gathered whole")
        return gather(model, *a, **kw)

    finish.gather_plain_model = forbidden


if __name__ != "__main__" and not __name__.startswith("test_") and "torchtitan_clt_custom" in __name__:
    _forbid_gathers()
