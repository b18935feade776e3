"""The sparse step's activations as (id, value) pairs (``protocols.transcoder.SparseCode``): what the
trainer reads from them (fired features, L0, the sparsity terms) against the dense tensor they
stand for, and a Trainer step that never builds that tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchtitan_clt.config import load_config
from torchtitan_clt.metrics.training import l0_of_code, l0_per_layer
from torchtitan_clt.models.losses import code_sparsity, l1_sparsity, tanh_sparsity
from torchtitan_clt.protocols.transcoder import SparseCode, TranscoderOutput

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "train_configs/debug_model.toml")


def _code(n=6, n_layers=3, k=4, f=10, seed=0) -> SparseCode:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(f, generator=g)[:k] for _ in range(n * n_layers)]).view(n, n_layers, k)
    vals = torch.rand(n, n_layers, k, generator=g, dtype=torch.float64) + 0.1
    idx[0, 0, 1:] = -1  # padding (a short row)
    vals[0, 0, 1:] = 0.0
    vals[1, 2, 0] = 0.0  # a selected entry whose value is exactly 0: not active, as acts != 0 says
    return SparseCode(idx, vals.requires_grad_(), f)


def test_code_reads_like_its_dense_tensor():
    code = _code()
    dense = torch.zeros(6, 3, 10, dtype=torch.float64)
    for (n, layer, j), i in zip(torch.cartesian_prod(*map(torch.arange, code.idx.shape)), code.idx.flatten()):
        if i >= 0:
            dense[n, layer, i] = code.vals[n, layer, j].detach()
    assert torch.equal(code.to_dense().detach(), dense)
    assert torch.equal(code.fired(), (dense != 0).any(0))
    assert not code.fired()[2, code.idx[1, 2, 0]] or (dense[:, 2, code.idx[1, 2, 0]] != 0).any()
    torch.testing.assert_close(l0_of_code(code), l0_per_layer(dense), rtol=0, atol=0)

    norms = (torch.rand(3, 10, dtype=torch.float64) + 0.5).requires_grad_()
    for c in (2.0, None):
        got = code_sparsity(code, norms, c)
        ref_vals = code.to_dense()
        ref = tanh_sparsity(ref_vals, norms, c) if c is not None else l1_sparsity(ref_vals, norms)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-6, atol=0)
        g_got = torch.autograd.grad(got, (code.vals, norms))
        g_ref = torch.autograd.grad(ref, (code.vals, norms))
        keep = code.idx >= 0  # padding's gradient is dropped by the encoder's backward anyway
        torch.testing.assert_close(g_got[0][keep], g_ref[0][keep], rtol=1e-6, atol=1e-7)
        assert not g_got[0][~keep].any()
        torch.testing.assert_close(g_got[1], g_ref[1], rtol=1e-6, atol=1e-7)


def test_output_builds_acts_only_when_read():
    import dataclasses

    code = _code()
    out = TranscoderOutput(pre_acts=torch.zeros(1), y_hat=torch.zeros(1), code=code)
    copy = out.replace(y_hat=torch.ones(1))
    again = dataclasses.replace(out)  # how FSDP's hooks walk an output: every field read
    assert [f.name for f in dataclasses.fields(out)].count("acts") == 0
    assert out.dense_acts is None and copy.dense_acts is None and again.dense_acts is None
    assert torch.equal(copy.acts, code.to_dense())  # built on the first read, then kept
    assert copy.dense_acts is not None and out.dense_acts is None
    dense = TranscoderOutput(torch.zeros(1), torch.ones(2), torch.zeros(1))  # positional, as before
    assert torch.equal(dense.acts, torch.ones(2)) and dense.code is None
    assert torch.equal(dense.replace(acts=torch.zeros(2)).acts, torch.zeros(2))
    with pytest.raises(TypeError, match="acts"):
        TranscoderOutput(pre_acts=torch.zeros(1), y_hat=torch.zeros(1))


SYNTH = [
    "--config", DEBUG, "--training.device=cpu", "--metrics.enable_tensorboard=false",
    "--checkpoint.enable=false", "--eval.enable=false", "--data.source=synthetic",
    "--data.synthetic_n_layers=3", "--data.synthetic_d_model=16", "--model.features_per_layer=128",
    "--model.k=4", "--training.batch_size=64", "--training.steps=4", "--metrics.log_freq=100",
    "--lr_scheduler.warmup_steps=0", "--loss.lambda_sparsity=0.01",
]  # fmt: skip


@pytest.mark.parametrize(
    "act,scope,sparsity",
    [("topk", "layer", "tanh"), ("batchtopk", "layer", "l1"), ("batchtopk", "all", "tanh")],
)
def test_trainer_sparse_step_builds_no_dense_activations(tmp_path, monkeypatch, act, scope, sparsity):
    """A logged and an unlogged step on the sparse path never call ``SparseCode.to_dense``, and
    measure and train what the dense path does (losses, L0, the dead-feature counts)."""
    from torchtitan_clt.train import Trainer

    results = {}
    for path in ("dense", "sparse"):
        cfg = load_config(
            [
                *SYNTH, f"--job.dump_folder={tmp_path}", f"--job.name={path}", f"--model.activation={act}",
                f"--model.batchtopk_scope={scope}", f"--loss.sparsity={sparsity}",
            ]
        )  # fmt: skip
        trainer = Trainer(cfg)
        trainer.model.sparse_forward = path == "sparse"
        assert trainer.model.sparse_selection() is not None or path == "dense"
        with monkeypatch.context() as m:
            if path == "sparse":

                def refuse(self):
                    raise AssertionError("the sparse step built the dense [N, L, F] activations")

                m.setattr(SparseCode, "to_dense", refuse)
            s1 = trainer.train_step(1, collect=True)
            s2 = trainer.train_step(2)
        results[path] = (s1, s2, trainer.dead.tokens_since_fire.clone())
        trainer.metrics.close()
    (d1, d2, dead_d), (s1, s2, dead_s) = results["dense"], results["sparse"]
    assert d1.terms["sparsity"] > 0
    for a, b in ((d1, s1), (d2, s2)):
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        for name in a.terms:
            torch.testing.assert_close(b.terms[name], a.terms[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.stack(s1.l0), torch.stack(d1.l0), rtol=0, atol=0)
    assert torch.equal(dead_s, dead_d) and (dead_d == 0).any() and (dead_d > 0).any()


def test_every_slot_layout_matches_the_compacted_one():
    """TopK's layout keeps every slot (padding as feature 0, weight 0) so that building it reads
    nothing back: the CLT decode, its gradients and the sparse encoder's gradients equal the
    compacted layout's (float64), with padding in the first, a middle and the last row."""
    from torchtitan_clt.kernels.decode import CLTSparseDecodeTorch, encoder_grads_torch
    from torchtitan_clt.kernels.layout_torch import Layout, mark_every_slot

    g = torch.Generator().manual_seed(1)
    n, n_layers, k, f, d = 7, 3, 4, 12, 5
    idx = torch.stack([torch.randperm(f, generator=g)[:k].sort().values for _ in range(n * n_layers)])
    idx = idx.view(n, n_layers, k)
    idx[0, 0, 2:] = -1
    idx[0, 0, 0] = 0  # feature 0 beside padding: the same (row, feature) twice in the kept layout
    idx[3, 1, 1:] = -1
    idx[6, 2, :] = -1
    vals = torch.rand(n, n_layers, k, generator=g, dtype=torch.float64).masked_fill(idx < 0, 0)
    b_dec = torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    w = [torch.randn(f, n_layers - s, d, generator=g, dtype=torch.float64) for s in range(n_layers)]
    x = torch.randn(n, n_layers, d, generator=g, dtype=torch.float64)
    g_out = torch.randn(n, n_layers, d, generator=g, dtype=torch.float64)
    results = []
    for every in (False, True):
        i = idx.clone()
        if every:
            mark_every_slot(i)
        v = vals.clone().requires_grad_()
        ws = [t.clone().requires_grad_() for t in w]
        y = CLTSparseDecodeTorch.apply(i, v, b_dec, *ws)
        grads = torch.autograd.grad(y, (v, *ws), g_out)
        enc = encoder_grads_torch(i, vals, x, f)
        assert (Layout.of(i, f).padding is not None) == every
        results.append((y, *grads, *enc))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert not results[1][1][idx < 0].any()  # padding gets no gradient
