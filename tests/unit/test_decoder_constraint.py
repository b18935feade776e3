"""Unit-norm decoder rows (components/decoder_constraint.py), the auto dead-feature rule and
AuxK's α in the papers' units (models/losses.py)."""

import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.components.decoder_constraint import UnitNormDecoder, build_decoder_constraint
from torchtitan_clt.config import JobConfig
from torchtitan_clt.models.losses import dead_after_tokens_of


def _row_norms(m):
    return [torch.linalg.vector_norm(p.detach().double(), dim=dims) for p, dims in m.decoder_rows()]


@pytest.mark.parametrize("family", ["clt", "plt", "sae", "matryoshka_clt"])
def test_rows_stay_unit_norm_through_adamw_steps(family):
    extra = {"matryoshka_prefixes": [2, 4]} if family == "matryoshka_clt" else None
    m = tiny_model(family, "topk", L=3, d=5, F=6, extra=extra).double()
    c = UnitNormDecoder(m.decoder_rows())
    c.normalize()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p, _ in m.decoder_rows()]
    for _ in range(5):
        x, y = torch.randn(16, 3, 5, generator=g).double(), torch.randn(16, 3, 5, generator=g).double()
        loss = (m.forward_std(x).y_hat - y).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        c.project_grads()
        opt.step()
        c.normalize()
    for n in _row_norms(m):
        torch.testing.assert_close(n, torch.ones_like(n), rtol=0, atol=1e-12)
    assert any((p.detach() - b).abs().max() > 1e-3 for (p, _), b in zip(m.decoder_rows(), before))


def test_projection_removes_the_radial_part_by_hand():
    m = tiny_model("plt", "topk", L=1, d=2, F=2).double()
    with torch.no_grad():
        m.W_dec.copy_(torch.tensor([[[3.0, 4.0], [0.0, 2.0]]], dtype=torch.float64))
    m.W_dec.grad = torch.tensor([[[1.0, 1.0], [5.0, -1.0]]], dtype=torch.float64)
    UnitNormDecoder(m.decoder_rows()).project_grads()
    # row 0: w = (3, 4), g·w / ‖w‖² = 7/25 -> g − 7/25 w = (1 − 21/25, 1 − 28/25) = (0.16, −0.12)
    # row 1: w = (0, 2), g·w / ‖w‖² = −2/4 -> g + w/2 = (5, 0)
    want = torch.tensor([[[0.16, -0.12], [5.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(m.W_dec.grad, want, rtol=0, atol=1e-12)
    UnitNormDecoder(m.decoder_rows()).normalize()
    torch.testing.assert_close(m.W_dec.detach(), torch.tensor([[[0.6, 0.8], [0.0, 1.0]]]).double())


def test_auto_constrains_topk_families_with_rows_only():
    cfg = JobConfig()
    for act, family, want in [
        ("topk", "clt", True),
        ("batchtopk", "plt", True),
        ("jumprelu", "clt", False),
        ("topk", "molt", False),  # no plain decoder rows: auto leaves it free
    ]:
        cfg.model.activation, cfg.model.decoder_unit_norm = act, "auto"
        m = tiny_model(family, act, L=2, d=4, F=4)
        assert (build_decoder_constraint(m, cfg.model) is not None) is want, (act, family)
    cfg.model.decoder_unit_norm = "true"
    with pytest.raises(ValueError, match="decoder_unit_norm"):
        build_decoder_constraint(tiny_model("molt", "topk", L=2, d=4, F=4), cfg.model)
    cfg.model.activation, cfg.model.decoder_unit_norm = "topk", "false"
    assert build_decoder_constraint(tiny_model("clt", "topk", L=2, d=4, F=4), cfg.model) is None


def test_dead_rule_scales_with_the_run():
    cfg = JobConfig()
    cfg.training.steps, cfg.training.batch_size = 234, 512
    assert dead_after_tokens_of(cfg) == 234 * 512 // 20  # 5990: silent for a twentieth of the run
    cfg.training.steps, cfg.training.batch_size = 100_000, 4096
    assert dead_after_tokens_of(cfg) == 10_000_000  # long runs: sparsify's 10 M tokens
    cfg.loss.dead_after_tokens = 777
    assert dead_after_tokens_of(cfg) == 777


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["--loss.auxk_alpha=-0.5"], "auxk_alpha"),
        (["--loss.dead_after_tokens=-1"], "dead_after_tokens"),
    ],
)
def test_config_refuses_what_it_cannot_train_faithfully(overrides, needle):
    from torchtitan_clt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(["--data.source=synthetic", *overrides])
    # accumulation is fine for TopK (per token) and BatchTopK (selected over the whole step, issue 31)
    for act in ("topk", "batchtopk"):
        load_config(["--data.source=synthetic", f"--model.activation={act}", "--training.grad_accum_steps=2"])


def test_the_trainer_keeps_topk_rows_unit_norm(tmp_path):
    from torchtitan_clt.config import load_config
    from torchtitan_clt.train import Trainer

    args = [
        "--data.source=synthetic",
        "--data.synthetic_n_layers=3",
        "--data.synthetic_d_model=16",
        "--model.features_per_layer=32",
        "--model.activation=topk",
        "--model.k=4",
        "--loss.sparsity=none",
        "--training.steps=5",
        "--training.batch_size=64",
        "--optimizer.lr=1e-2",
        "--checkpoint.enable=false",
        "--checkpoint.export=false",
        "--metrics.enable_tensorboard=false",
        f"--job.dump_folder={tmp_path}",
    ]
    trainer = Trainer(load_config([*args, "--model.decoder_unit_norm=auto"]))
    assert trainer.decoder_constraint is not None  # auto: on for TopK
    start = [p.detach().clone() for p in trainer.model.W_dec]
    trainer.train()
    for p, s in zip(trainer.model.W_dec, start):
        n = torch.linalg.vector_norm(p.detach().double(), dim=(1, 2))
        torch.testing.assert_close(n, torch.ones_like(n), rtol=0, atol=1e-6)
        assert (p.detach() - s).abs().max() > 1e-4  # it trained
    off = Trainer(load_config([*args, "--model.decoder_unit_norm=false", "--job.name=off"]))
    assert off.decoder_constraint is None
    off.train()
    norms = torch.cat([torch.linalg.vector_norm(p.detach(), dim=(1, 2)) for p in off.model.W_dec])
    assert (norms - 1).abs().max() > 1e-2  # free rows drift from any fixed norm
