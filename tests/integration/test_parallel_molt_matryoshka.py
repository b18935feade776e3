"""MOLT and the Matryoshka CLT under tensor parallelism (the ``features`` layout, issue 31) train
exactly like one process.

Worker part: each layout runs as one ``torchrun --standalone`` launch of this file. Every rank
builds the sharded model on the meta device (parallelize -> to_empty -> init_weights, the
trainer's order) *and* a one-process reference with the same seed; both take 6 AdamW steps on the
same global batches (the sharded model on its data-parallel slice), case after case. Per step the
losses must agree, and the gathered gates / features (``acts.full_tensor()``), their L0 and the
decoder norms must equal the reference's in the global feature order: MOLT's gates are one
contiguous block per rank while each group's transforms are sharded on their own, so a gate sent
to the wrong transform (or a norm to the wrong gate) shows up here at once. Final whole weights
within 1e-4. Spies check the path: MOLT's gates crossed ranks by all-to-all, its sparse group
decode ran where forced (``MOLT_SPARSE_BELOW`` = 1), TopK / BatchTopK selected over the ranks
(``select`` with a group), and the Matryoshka prefixes' partial sums crossed ranks as one stacked
all-reduce per forward.

Trainer part: a MOLT trained by ``run_train.sh`` on tp=2 matches one process (losses of every
step, L0 / FVU / dead fraction logged, the native export gathered on rank 0), and resumed from its
tp=2 checkpoint on one process it continues with the same losses and export.

Tolerance: 1e-5 relative on losses and 1e-4 absolute on weights, from fp32 reordering only (tp
partial sums and the FSDP gradient average add in another order); a wrong reduction or a gate
paired with the wrong transform is off by O(1e-1).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from mesh_cases import FixedDead, run_layout, worker

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

CASES = {  # layout: [(family, activation, batchtopk scope, extra loss terms and "sparse")]
    "tp2": [
        ("molt", "jumprelu", "layer", "preact+sparse"),
        ("molt", "topk", "layer", ""),
        ("molt", "batchtopk", "all", "auxk+sparse"),
        ("matryoshka_clt", "batchtopk", "layer", "auxk"),
        ("matryoshka_clt", "topk", "layer", ""),
    ],
    "dp2xtp2": [
        ("molt", "batchtopk", "layer", "sparse"),
        ("molt", "jumprelu", "layer", "preact"),
        ("matryoshka_clt", "batchtopk", "all", "auxk"),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(CASES))
def test_tp_matches_one_process(tmp_path, layout):
    for case, res in zip(CASES[layout], run_layout(HERE, tmp_path, layout, CASES[layout])):
        ref, got = res["ref_losses"], res["losses"]
        assert len(got) == len(ref) == STEPS
        for step, (a, b) in enumerate(zip(got, ref)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{case} step {step}: {a} vs one-process {b}"
        assert res["max_acts_diff"] < 1e-4, (case, res)  # the gates / features, in global order
        assert res["max_norms_diff"] < 1e-4, (case, res)
        assert res["l0"] == res["ref_l0"], (case, res)
        assert res["max_weight_diff"] < 1e-4, (case, res)
        assert res["weights_moved"] > 1e-3, (case, res)  # not a comparison of two untouched inits
        for name in res["terms_expected"]:
            assert res["terms_seen"][name] == STEPS, (case, res)
        if case[1] in ("batchtopk", "topk"):
            assert res["threshold_diff"] < 1e-5, (case, res)
            assert res["selections_over_ranks"] >= STEPS, (case, res)
        if case[0] == "molt":
            assert res["exchanges"] >= 2 * STEPS, (case, res)  # gates there, norms back
            assert (res["sparse_groups"] > 0) == ("sparse" in case[3]), (case, res)
        else:
            assert res["prefix_sums"] >= STEPS, (case, res)


# ---------------------------------------------------------------------------------------------
# trainer: MOLT on tp=2 through run_train.sh, its metrics, its export, and a resume on one process

N = 4  # checkpoint at step N of 2N
METRICS_EXACT = ("l0", "fvu", "dead_frac", "l0_per_layer", "fvu_per_layer")  # as logged (rounded)


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
def test_molt_trainer_tp2_metrics_export_and_resume_on_one_process(tmp_path):
    sys.path.insert(0, str(HERE.parent))
    import test_parallel_families as fam
    from test_parallel import assert_same_training, run_training, weights

    args = fam.BASE + fam.FAMILIES["molt"]
    args += [f"--training.steps={2 * N}", "--checkpoint.enable=true", f"--checkpoint.interval={N}"]
    args += ["--checkpoint.keep_latest_k=0"]
    one = run_training(tmp_path, "one", 1, args)
    tp2 = run_training(tmp_path, "tp2", 2, args + fam.TP2)
    assert_same_training(tp2, one, 2 * N)  # losses of every step; the export gathered on rank 0
    got, want = _rows(tp2), _rows(one)
    for step in want:
        for key in METRICS_EXACT:
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
        a, b = got[step]["loss_sparsity"], want[step]["loss_sparsity"]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (step, a, b)

    folder = tmp_path / "resume"
    ckpt = folder / "resumed" / "checkpoints" / f"step-{N}"
    shutil.copytree(tp2 / "checkpoints" / f"step-{N}", ckpt)
    resumed = run_training(folder, "resumed", 1, args)
    after = _rows(resumed)
    assert sorted(after) == list(range(N + 1, 2 * N + 1)), sorted(after)
    for step, row in after.items():
        assert abs(row["loss"] - got[step]["loss"]) <= 1e-5 * max(1.0, abs(got[step]["loss"])), step
    w, w_ref = weights(resumed), weights(tp2)
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        assert (w[k].float() - w_ref[k].float()).abs().max().item() <= 1e-4, k


# ---------------------------------------------------------------------------------------------
# worker (runs under torchrun)

STEPS = 6
L, D, B, K = 2, 8, 24, 3
F = 16
EXTRA = {
    # tp2 blocks are gates [0, 8) and [8, 16): group 1 straddles them, group 0 sits in block 0.
    "molt": {"molt_ranks": [4, 2], "molt_counts": [4, 12]},
    # prefix 4 lies in rank 0's block only, prefix 12 straddles both.
    "matryoshka_clt": {"matryoshka_prefixes": [4, 12, 16]},
}


def _train_case(cfg, dims, family: str, activation: str, scope: str, extra: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import torchtitan_clt.distributed.tensor_parallel as tensor_parallel
    import torchtitan_clt.models.activations as activations
    import torchtitan_clt.models.matryoshka.model as matryoshka_model
    import torchtitan_clt.models.molt.model as molt_model
    from torchtitan_clt.distributed.loss import build_loss_fn_for_mesh
    from torchtitan_clt.distributed.parallelize import parallelize_model
    from torchtitan_clt.distributed.utils import clip_grad_norm_
    from torchtitan_clt.models import build_loss_fn
    from torchtitan_clt.protocols import model_registry
    from torchtitan_clt.protocols.transcoder import TranscoderArgs

    cfg.model.name, cfg.model.activation, cfg.model.k, cfg.model.batchtopk_scope = (
        family,
        activation,
        K,
        scope,
    )
    cfg.loss.sparsity = "none" if family == "matryoshka_clt" else "tanh"
    cfg.loss.lambda_sparsity = 0.01
    cfg.loss.lambda_preact = 0.05 if "preact" in extra else 0.0
    cfg.loss.auxk_alpha, cfg.loss.auxk_k = (0.5, 2) if "auxk" in extra else (0.0, 512)
    args = TranscoderArgs(
        family=family, n_layers=L, d_in=D, d_out=D, features_per_layer=F, activation=activation, k=K,
        batchtopk_scope=scope, jumprelu_threshold_init=0.05, jumprelu_bandwidth=0.5,
        skip_connection=family == "matryoshka_clt", extra=EXTRA[family],
    )  # fmt: skip
    counts = {"exchanges": 0, "sparse_groups": 0, "selections_over_ranks": 0, "prefix_sums": 0}

    def counted(fn, key, when=lambda *a, **kw: True):
        def run(*a, **kw):
            counts[key] += bool(when(*a, **kw))
            return fn(*a, **kw)

        return run

    patches = [
        (tensor_parallel, "_all_to_all_last"),
        (molt_model.MixtureOfLinearTransforms, "_group_sparse"),
        (activations, "select"),
        (matryoshka_model, "sum_partials"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    tensor_parallel._all_to_all_last = counted(tensor_parallel._all_to_all_last, "exchanges")
    molt_model.MixtureOfLinearTransforms._group_sparse = counted(saved[1][2], "sparse_groups")
    activations.select = counted(
        saved[2][2], "selections_over_ranks", lambda *a, **kw: kw.get("group") is not None
    )
    matryoshka_model.sum_partials = counted(saved[3][2], "prefix_sums", lambda x, g: x.dim() == 4)
    molt_model.MOLT_SPARSE_BELOW = 1.0 if "sparse" in extra else -1.0  # forced either way
    try:
        spec = model_registry.get(family)
        ref = spec.build_fn(args)
        ref.init_weights(seed=7)
        with torch.device("meta"):
            model = spec.build_fn(args)
        model = parallelize_model(model, spec, dims, cfg)
        model.to_empty(device="cpu")
        model.init_weights(seed=7)

        dead = FixedDead(torch.arange(L * F).view(L, F) % 3 == 0)  # a third of the features
        loss_fn = build_loss_fn(cfg.loss, dead_features=dead)
        tp_loss_fn = build_loss_fn_for_mesh(cfg.loss, dims, dead_features=dead)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        mix = torch.randn(L, D, D, generator=gen) / D**0.5
        losses, ref_losses, acts_diff, norms_diff, l0, ref_l0 = [], [], 0.0, 0.0, [], []
        terms_expected = [t for t in extra.split("+") if t and t != "sparse"]
        seen = dict.fromkeys(terms_expected, 0)
        n_local = B // dims.dp_degree
        lo = dims.dp_rank * n_local
        for step in range(STEPS):
            x = torch.randn(B, L, D, generator=gen)
            y = torch.einsum("bld,lde->ble", torch.relu(x), mix)
            out_ref = ref.forward_std(x)
            loss_ref, _ = loss_fn(ref, out_ref, y, step)
            opt_ref.zero_grad()
            loss_ref.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt_ref.step()
            ref_losses.append(loss_ref.item())

            out = model.forward_std(x[lo : lo + n_local])
            assert isinstance(out.acts, DTensor) and out.acts.shape == (n_local, L, F)
            acts = out.acts.full_tensor().detach()
            acts_diff = max(acts_diff, (acts - out_ref.acts[lo : lo + n_local].detach()).abs().max().item())
            if out_ref.dec_norms is not None:
                norms = out.dec_norms.full_tensor().detach()
                norms_diff = max(norms_diff, (norms - out_ref.dec_norms.detach()).abs().max().item())
            l0.append(int((acts != 0).sum()))
            ref_l0.append(int((out_ref.acts[lo : lo + n_local] != 0).sum()))
            loss, terms = tp_loss_fn(model, out, y[lo : lo + n_local], step)
            for name in terms_expected:
                seen[name] += name in terms and float(terms[name]) > 0
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(list(model.parameters()), 1.0)
            opt.step()
            t = loss.detach().clone()
            dist.all_reduce(t)  # tp ranks hold the same value; mean over all ranks = mean over dp
            losses.append(t.item() / dist.get_world_size())

        full = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in model.named_parameters()
        }
        init = spec.build_fn(args)
        init.init_weights(seed=7)
        ref_sd, init_sd = dict(ref.named_parameters()), dict(init.named_parameters())
        assert full.keys() == ref_sd.keys()
        max_diff = max((full[n] - ref_sd[n]).abs().max().item() for n in ref_sd)
        moved = max((ref_sd[n] - init_sd[n]).abs().max().item() for n in ref_sd)
        thr_diff = 0.0
        if isinstance(getattr(ref.activation, "threshold", None), torch.Tensor):
            thr_diff = (model.activation.threshold - ref.activation.threshold).abs().max().item()
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return {"losses": losses, "ref_losses": ref_losses, "max_weight_diff": max_diff,
            "weights_moved": moved, "threshold_diff": thr_diff, "max_acts_diff": acts_diff,
            "max_norms_diff": norms_diff, "l0": l0, "ref_l0": ref_l0, "terms_seen": seen,
            "terms_expected": terms_expected, **counts}  # fmt: skip


if __name__ == "__main__":
    worker(*sys.argv[1:4], _train_case)
