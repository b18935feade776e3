"""The ``code`` tensor-parallel layout (``parallelism.tp_layout = "code"``, issue 27): a CLT / PLT /
SAE sharded by distributed.parallelize (no trainer) on a gloo mesh trains like one process.

Each layout runs as ``torchrun --standalone`` on this file. Every rank builds the sharded model on
the meta device (parallelize -> to_empty -> init_weights, the trainer's order) *and* a one-process
reference with the same seed; both take 6 AdamW steps on the same global batches (the sharded model
on its data-parallel slice). The losses of each step and the final whole weights (the CLT's and
PLT's skip path included, split over tp) must agree.

Tolerance: 1e-5 relative on losses and 1e-4 absolute on weights (after 6 Adam steps of lr 1e-2),
from fp32 reordering only (the tp partial sums and the FSDP gradient average add in a different
order than one matmul); a wrong reduction (a missing or doubled all-reduce, a local BatchTopK) is
off by O(1). A spy checks the code path was taken: the decoder's gather ran, the features
layout's dense sum of ŷ (``sum_partials``) never did, and ŷ / W_dec are sliced over d_out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mesh_cases import FixedDead, run_layout, worker

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]

CASES = {  # layout: [(family, activation, batchtopk scope, extra loss terms and "sparse")]
    # "sparse": the sparse step (kernels.sparse_density_threshold = 1: SparseEncode, the selection
    # over ranks, decode_selected); else k / F is over the threshold and the activation's dense
    # output is compacted before the gather (the path JumpReLU always takes).
    "tp2": [
        ("clt", "batchtopk", "layer", "sparse"),
        ("clt", "batchtopk", "layer", ""),
        ("clt", "topk", "all", "sparse"),
        ("plt", "jumprelu", "all", "preact+auxk"),
        ("sae", "topk", "all", "sparse"),
    ],
    "tp4": [
        ("clt", "batchtopk", "all", "auxk+sparse"),
        ("clt", "topk", "all", ""),
        ("clt", "jumprelu", "all", "preact"),
        ("sae", "batchtopk", "layer", "sparse"),
        ("plt", "topk", "all", "sparse"),
    ],
    "dp2xtp2": [
        ("clt", "batchtopk", "all", "auxk+sparse"),
        ("clt", "topk", "layer", "sparse"),
        ("plt", "batchtopk", "layer", "sparse"),
        ("clt", "jumprelu", "layer", "preact"),
    ],
    "rep2xtp2": [  # HSDP's replicate dimension beside tp (clt_8b's dp_replicate = N / 32)
        ("clt", "batchtopk", "all", "sparse"),
        ("sae", "jumprelu", "all", "preact"),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(CASES))
def test_code_layout_matches_one_process(tmp_path, layout):
    for case, res in zip(CASES[layout], run_layout(HERE, tmp_path, layout, CASES[layout])):
        ref, got = res["ref_losses"], res["losses"]
        assert len(got) == len(ref) == STEPS
        for step, (a, b) in enumerate(zip(got, ref)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{case} step {step}: {a} vs one-process {b}"
        assert res["max_weight_diff"] < 1e-4, (case, res)
        assert res["weights_moved"] > 1e-3, (case, res)  # not a comparison of two untouched inits
        if case[1] in ("batchtopk", "topk"):
            assert res["threshold_diff"] < 1e-5, (case, res)
        assert res["code_gathers"] > 0 and res["dense_sums"] == 0, (case, res)  # the path taken
        assert (res["sparse_steps"] > 0) == ("sparse" in case[3]), (case, res)


# ---------------------------------------------------------------------------------------------
# worker (runs under torchrun)

STEPS = 6
L, D, F, B, K = 3, 8, 16, 24, 3


def _train_case(cfg, dims, family: str, activation: str, scope: str, extra: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    import torchtitan_clt.distributed.tensor_parallel as tensor_parallel
    import torchtitan_clt.kernels.sparse_step as sparse_step
    import torchtitan_clt.models.common as common
    from torchtitan_clt import kernels
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
    cfg.loss.lambda_sparsity = 0.01
    cfg.loss.lambda_preact = 0.05 if "preact" in extra else 0.0
    cfg.loss.auxk_alpha, cfg.loss.auxk_k = (0.5, 2) if "auxk" in extra else (0.0, 512)
    args = TranscoderArgs(
        family=family, n_layers=1 if family == "sae" else L, d_in=D, d_out=D, features_per_layer=F,
        activation=activation, k=K, batchtopk_scope=scope, jumprelu_threshold_init=0.05,
        jumprelu_bandwidth=0.5, skip_connection=family in ("clt", "plt"),
        **({"hook_in": "resid_post", "hook_out": "resid_post"} if family == "sae" else {}),
    )  # fmt: skip
    n_layers = args.n_layers
    dense_sums, sparse_steps = [0], [0]
    terms_expected = [t for t in extra.split("+") if t and t != "sparse"]
    kernels.configure(sparse_density_threshold=1.0 if "sparse" in extra else 0.05)

    def spy_sparse(*a, **kw):  # the sharded model's sparse step (encoder, selection, sparse decode)
        sparse_steps[0] += kw.get("group") is not None and kw.get("tp_group") is None
        return real_sparse(*a, **kw)

    real_sparse = common.sparse_forward
    common.sparse_forward = spy_sparse

    def spy(x, group):  # the features layout's dense sum of partial ŷ: must not run
        dense_sums[0] += 1
        return real_sum(x, group)

    real_sum = sparse_step.sum_partials
    sparse_step.sum_partials = tensor_parallel.sum_partials = spy
    spec = model_registry.get(family)
    ref = spec.build_fn(args)
    ref.init_weights(seed=7)
    with torch.device("meta"):
        model = spec.build_fn(args)
    model = parallelize_model(model, spec, dims, cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=7)
    # The decoder side is split over d_out (the last placement is tp's; FSDP's comes first).
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("W_dec", "W_skip", "b_dec"):
            assert p.placements[-1] == Shard(p.dim() - 1), (name, p.placements)

    dead = FixedDead(torch.arange(n_layers * F).view(n_layers, F) % 3 == 0)  # a third of the features
    loss_fn = build_loss_fn(cfg.loss, dead_features=dead)
    tp_loss_fn = build_loss_fn_for_mesh(cfg.loss, dims, dead_features=dead)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(n_layers, D, D, generator=gen) / D**0.5
    losses, ref_losses = [], []
    n_local = B // dims.dp_degree
    lo = dims.dp_rank * n_local
    for step in range(STEPS):
        x = torch.randn(B, n_layers, D, generator=gen)
        y = torch.einsum("bld,lde->ble", torch.relu(x), mix)
        out_ref = ref.forward_std(x)
        loss_ref, _ = loss_fn(ref, out_ref, y, step)
        opt_ref.zero_grad()
        loss_ref.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
        ref_losses.append(loss_ref.item())

        out = model.forward_std(x[lo : lo + n_local])
        assert isinstance(out.acts, DTensor) and out.acts.shape == (n_local, n_layers, F)
        assert isinstance(out.y_hat, DTensor) and out.y_hat.to_local().shape == (
            n_local,
            n_layers,
            D // dims.tp,
        )
        loss, terms = tp_loss_fn(model, out, y[lo : lo + n_local], step)
        for name in terms_expected:
            assert name in terms and float(terms[name]) > 0, (name, terms)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)  # tp ranks hold the same value; mean over all ranks = mean over dp
        losses.append(t.item() / dist.get_world_size())

    full = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()
    }
    init = spec.build_fn(args)
    init.init_weights(seed=7)
    ref_sd, init_sd = dict(ref.named_parameters()), dict(init.named_parameters())
    max_diff = max((full[n] - ref_sd[n]).abs().max().item() for n in ref_sd)
    moved = max((ref_sd[n] - init_sd[n]).abs().max().item() for n in ref_sd)
    thr_diff = 0.0
    if isinstance(getattr(ref.activation, "threshold", None), torch.Tensor):
        thr_diff = (model.activation.threshold - ref.activation.threshold).abs().max().item()
    sparse_step.sum_partials = tensor_parallel.sum_partials = real_sum
    common.sparse_forward = real_sparse
    return {"losses": losses, "ref_losses": ref_losses, "max_weight_diff": max_diff,
            "weights_moved": moved, "threshold_diff": thr_diff, "dense_sums": dense_sums[0],
            "code_gathers": model.decode_selected.calls, "sparse_steps": sparse_steps[0]}  # fmt: skip


if __name__ == "__main__":
    worker(*sys.argv[1:4], _train_case, tp_layout="code")
