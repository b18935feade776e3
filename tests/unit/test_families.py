"""SAE, MOLT, Matryoshka CLT: float64 references, the MOLT norm, sparse = dense paths, errors."""

import math

import pytest
import torch
from helpers import tiny_args

import torchtitan_clt.models.molt.model as molt_mod
from torchtitan_clt.config import ConfigError, JobConfig
from torchtitan_clt.models.clt.model import CrossLayerTranscoder
from torchtitan_clt.models.matryoshka.model import MatryoshkaCLT, matryoshka_prefixes
from torchtitan_clt.models.molt.model import MixtureOfLinearTransforms, molt_groups
from torchtitan_clt.models.sae.model import SparseAutoencoder
from torchtitan_clt.protocols import get_model_spec, model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

_args = tiny_args


def _build(args, seed=0):
    m = model_registry.get(args.family).build_fn(args)
    m.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.b_enc.copy_(0.1 * torch.randn(m.b_enc.shape, generator=g))
        m.b_dec.copy_(torch.randn(m.b_dec.shape, generator=g))
    return m


def test_every_family_registered():
    assert {"plt", "clt", "sae", "molt", "matryoshka_clt"} <= set(model_registry.names())
    assert type(_build(_args("sae"))) is SparseAutoencoder
    assert type(_build(_args("molt"))) is MixtureOfLinearTransforms
    assert type(_build(_args("matryoshka_clt", act="topk"))) is MatryoshkaCLT


def test_family_fields_travel_in_args_extra():
    cfg = JobConfig()
    cfg.model.name, cfg.model.molt_ranks, cfg.model.molt_counts = "molt", [4, 2], [1, 2]
    a = TranscoderArgs.from_job_config(cfg, 2, 8, 8, [0, 1], "m", "resid_mid", "mlp_out")
    assert a.extra == {"molt_ranks": [4, 2], "molt_counts": [1, 2]}
    cfg.model.name, cfg.model.matryoshka_prefixes = "matryoshka_clt", [8, 16]
    a = TranscoderArgs.from_job_config(cfg, 2, 8, 8, [0, 1], "m", "resid_mid", "mlp_out")
    assert a.extra == {"matryoshka_prefixes": [8, 16]}
    cfg.model.name = "clt"
    assert TranscoderArgs.from_job_config(cfg, 2, 8, 8, [0, 1], "m", "resid_mid", "mlp_out").extra == {}


# --- SAE ---------------------------------------------------------------------------------------
def test_sae_matches_float64_reference_and_needs_one_hook():
    m = _build(_args("sae", act="jumprelu"))
    x = torch.randn(6, 3, 4)
    h = torch.einsum("bld,lfd->blf", x.double(), m.W_enc.double()) + m.b_enc.double()
    a = h * (h > 0.05)
    y = torch.einsum("blf,lfd->bld", a, m.W_dec.double()) + m.b_dec.double()
    out = m.forward_std(x)
    assert out.acts.count_nonzero() > 0
    torch.testing.assert_close(out.y_hat.double(), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="hook_in"):
        model_registry.get("sae").build_fn(
            TranscoderArgs(family="sae", d_in=4, d_out=4)
        )  # resid_mid -> mlp_out


# --- MOLT --------------------------------------------------------------------------------------
def _molt_reference(m, x, gates):
    """Σ_j g_j U_j (V_j x + c_j) + b with every U_j V_j formed explicitly, float64."""
    B, L = x.shape[:2]
    y = m.b_dec.double().expand(B, L, -1).clone()
    j = 0
    for U, V, c in zip(m.U, m.V, m.V_bias):
        for t in range(U.shape[1]):
            for layer in range(L):
                Uj = U[layer, t].double().T  # [d_out, r]
                z = x[:, layer].double() @ V[layer, t].double().T + c[layer, t].double()  # [B, r]
                y[:, layer] += gates[:, layer, j + t, None].double() * (z @ Uj.T)
        j += U.shape[1]
    return y


def test_molt_groups():
    a = _args("molt")
    assert molt_groups(a) == [(3, 2), (2, 3), (1, 4)]
    d = TranscoderArgs(family="molt", features_per_layer=40, extra={"molt_ranks": [8, 4, 2]})
    assert molt_groups(d) == [(8, 5), (4, 10), (2, 25)]  # N = 40 // 7 = 5; the last takes the rest
    for bad in ({"molt_ranks": [2, 1], "molt_counts": [4, 4]}, {"molt_ranks": [0]}):
        with pytest.raises(ConfigError, match="molt"):
            molt_groups(TranscoderArgs(family="molt", features_per_layer=9, extra=bad))


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk", "batchtopk"])
def test_molt_matches_explicit_float64_reference(act):
    m = _build(_args("molt", act=act))
    with torch.no_grad():
        for c in m.V_bias:
            c.normal_()  # exercise the (fold-only) low-rank bias too
    x = torch.randn(8, 3, 4)
    out = m.forward_std(x)
    assert out.acts.count_nonzero() > 0 and out.acts.shape == (8, 3, 9)
    torch.testing.assert_close(out.y_hat.double(), _molt_reference(m, x, out.acts), rtol=1e-5, atol=1e-5)


def test_molt_norm_equals_explicit_frobenius_norm():
    m = _build(_args("molt", d=5))
    want = []
    for U, V in zip(m.U, m.V):
        prod = torch.einsum("lnro,lnri->lnoi", U.double(), V.double())  # U_j V_j [L, n, d_out, d_in]
        want.append(torch.linalg.matrix_norm(prod))  # Frobenius
    want = torch.cat(want, dim=1)
    torch.testing.assert_close(m.decoder_norms("concat").double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.decoder_norms("sum").double(), want, rtol=1e-5, atol=1e-6)
    # init scales every transform to ‖U_j V_j‖_F = 1 (the default), or decoder_init_norm
    torch.testing.assert_close(m.transform_norms(), torch.ones(3, 9), rtol=1e-5, atol=1e-5)
    m2 = _build(_args("molt", decoder_init_norm=0.25))
    torch.testing.assert_close(m2.transform_norms(), torch.full((3, 9), 0.25), rtol=1e-5, atol=1e-5)


def test_molt_sparse_path_equals_dense_path(monkeypatch):
    m = _build(_args("molt", act="jumprelu", d=6))
    x = torch.randn(5, 3, 6)
    gates = torch.relu(torch.randn(5, 3, 9)) * (torch.rand(5, 3, 9) < 0.3)
    gates[:, :, 2:4] = 0  # whole transforms off everywhere: the sparse path skips them
    on = (gates != 0).any(0)  # [L, N]
    params = [m.U[0], m.V[2], m.b_dec]

    def run(below):
        monkeypatch.setattr(molt_mod, "MOLT_SPARSE_BELOW", below)
        g = gates.clone().requires_grad_()
        y = m.decode_std(g, x)
        return (y, *torch.autograd.grad(y.square().sum(), [g, *params]))

    dense, sparse = run(-1.0), run(2.0)  # always dense / always sparse
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense[0].double(), _molt_reference(m, x, gates), rtol=1e-5, atol=1e-5)
    # gate gradients: exact on the transforms computed, 0 on those left out
    torch.testing.assert_close(sparse[1], torch.where(on, dense[1], torch.zeros(())), rtol=1e-5, atol=1e-5)
    for a, b in zip(sparse[2:], dense[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_molt_sparse_training_keeps_the_jumprelu_threshold_gradient(monkeypatch):
    """forward_std also computes transforms whose gate sits just below θ (the STE reads them)."""
    m = _build(_args("molt", act="jumprelu", d=6))
    x = torch.randn(6, 3, 6)
    with torch.no_grad():  # transforms 5..8 never fire, but sit just under θ = 0.05 (ε/2 = 0.05)
        m.W_enc[:, 5:].zero_()
        m.b_enc[:, 5:] = 0.03

    def theta_grad(below):
        monkeypatch.setattr(molt_mod, "MOLT_SPARSE_BELOW", below)
        m.zero_grad()
        m.forward_std(x).y_hat.square().sum().backward()
        return m.activation.log_threshold.grad.clone()

    dense, sparse = theta_grad(-1.0), theta_grad(2.0)
    assert dense[:, 5:].abs().min() > 0
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_molt_public_api_and_gradients():
    m = _build(_args("molt", act="jumprelu"))
    x = torch.randn(6, 3, 4)
    acts = m.encode(x)
    torch.testing.assert_close(m(x), m.decode(acts, x))
    with pytest.raises(ValueError, match="input"):
        m.decode(acts)
    out = m.forward_std(x)
    (out.y_hat.square().sum() + m.decoder_norms().sum()).backward()
    for name, p in m.named_parameters():
        if name.startswith("V_bias"):
            assert not p.requires_grad and p.grad is None, name  # frozen: only folding writes it
        else:
            assert p.grad is not None, name


# --- Matryoshka CLT ------------------------------------------------------------------------------
def test_matryoshka_prefixes():
    assert matryoshka_prefixes(TranscoderArgs(features_per_layer=64)) == [4, 8, 16, 32, 64]
    a = TranscoderArgs(features_per_layer=10, extra={"matryoshka_prefixes": [2, 5]})
    assert matryoshka_prefixes(a) == [2, 5, 10]
    for bad in ([5, 2], [0, 3], [3, 11]):
        with pytest.raises(ConfigError, match="matryoshka_prefixes"):
            matryoshka_prefixes(TranscoderArgs(features_per_layer=10, extra={"matryoshka_prefixes": bad}))


@pytest.mark.parametrize("act", ["topk", "batchtopk"])
def test_matryoshka_prefix_reconstructions_match_float64(act):
    m = _build(_args("matryoshka_clt", act=act, F=6, extra={"matryoshka_prefixes": [1, 4]}))
    x = torch.randn(7, 3, 4)
    out = m.forward_std(x)
    assert len(out.y_hat_prefixes) == 3 and out.y_hat is out.y_hat_prefixes[-1]
    for ys, hi in zip(out.y_hat_prefixes, [1, 4, 6]):
        ref = m.b_dec.double().expand(7, 3, 4).clone()
        for t in range(3):
            for s in range(t + 1):
                ref[:, t] += out.acts[:, s, :hi].double() @ m.W_dec[s][:hi, t - s].double()
        torch.testing.assert_close(ys.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.y_hat, CrossLayerTranscoder.decode_std(m, out.acts), rtol=1e-5, atol=1e-5)


def test_matryoshka_rejects_unbudgeted_activations():
    assert get_model_spec("matryoshka_clt").activations == ("topk", "batchtopk")
    for act in ("relu", "jumprelu"):
        with pytest.raises(ConfigError, match="model.activation"):
            model_registry.get("matryoshka_clt").build_fn(_args("matryoshka_clt", act=act))


# --- every family ------------------------------------------------------------------------------
FAMILY_ACTS = [
    (f, a)
    for f in ("plt", "clt", "sae", "molt", "matryoshka_clt")
    for a in ("relu", "jumprelu", "topk", "batchtopk")
    if not (f == "matryoshka_clt" and a in ("relu", "jumprelu"))
]


@pytest.mark.parametrize("family,act", FAMILY_ACTS)
def test_meta_init_matches_cpu_init_and_every_parameter_learns(family, act):
    args = _args(family, act=act)
    cpu = model_registry.get(family).build_fn(args)
    cpu.init_weights(3)
    with torch.device("meta"):
        meta = model_registry.get(family).build_fn(args)
    meta.to_empty(device="cpu")
    meta.init_weights(3)
    for k, v in cpu.state_dict().items():
        assert torch.equal(v, meta.state_dict()[k]), k
    out = cpu.forward_std(torch.randn(32, 3, 4))
    assert torch.isfinite(out.y_hat).all()
    (out.y_hat.square().sum() + out.acts.sum() + cpu.decoder_norms().sum()).backward()
    for name, p in cpu.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_trainer_rejects_bad_family_activation_pair():
    from torchtitan_clt.train import Trainer

    cfg = JobConfig()
    cfg.model.name, cfg.model.activation = "matryoshka_clt", "jumprelu"
    with pytest.raises(ConfigError, match="does not work with model.name"):
        Trainer(cfg)


def test_clt_and_matryoshka_share_parameters():
    """At inference a Matryoshka CLT is a CLT: its weights load into one unchanged."""
    m = _build(_args("matryoshka_clt", act="batchtopk"))
    m.forward_std(torch.randn(16, 3, 4))
    clt = model_registry.get("clt").build_fn(_args("clt", act="batchtopk"))
    clt.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(clt.eval()(x), m.eval()(x))
    assert math.isfinite(float(m.eval()(x).detach().sum()))


@pytest.mark.parametrize(
    "family,act", [("sae", "topk"), ("molt", "jumprelu"), ("matryoshka_clt", "batchtopk")]
)
def test_native_export_roundtrip(family, act, tmp_path):
    from torchtitan_clt.checkpoint.export import export_native, load_pretrained

    m = _build(_args(family, act=act))
    g = torch.Generator().manual_seed(5)
    m.set_standardization(
        torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) + 0.5,
        torch.randn(3, 4, generator=g), torch.rand(3, 1, generator=g) + 0.5,
    )  # fmt: skip
    m.forward_std(torch.randn(32, 3, 4))  # tracks a threshold (TopK / BatchTopK)
    export_native(m, tmp_path / "export")
    loaded = load_pretrained(tmp_path / "export")
    assert type(loaded) is type(m) and loaded.args.extra == m.args.extra
    x = torch.randn(6, 3, 4) * 2 + 1
    torch.testing.assert_close(loaded(x), m.eval()(x), rtol=1e-4, atol=1e-4)
