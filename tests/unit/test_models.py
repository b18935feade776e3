"""PLT / CLT: equivalences, float64 references, norms, folding, init on meta."""

import math

import pytest
import torch
from helpers import tiny_args

from torchtitan_clt.config import JobConfig
from torchtitan_clt.models.clt.model import CrossLayerTranscoder
from torchtitan_clt.models.plt.model import PerLayerTranscoder
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ACTS = ["relu", "jumprelu", "topk", "batchtopk"]


def _args(family="clt", L=3, d_in=4, d_out=4, F=6, act="relu", **kw):
    return tiny_args(family, act, L=L, d_in=d_in, d_out=d_out, F=F, **kw)


def _build(args, seed=0, randomize_biases=True):
    m = model_registry.get(args.family).build_fn(args)
    m.init_weights(seed)
    if randomize_biases:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            m.b_enc.copy_(0.1 * torch.randn(m.b_enc.shape, generator=g))
            m.b_dec.copy_(torch.randn(m.b_dec.shape, generator=g))
    return m


def _standardize(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    L, di, do = m.args.n_layers, m.args.d_in, m.args.d_out
    m.set_standardization(
        torch.randn(L, di, generator=g),
        torch.rand(L, di, generator=g) + 0.5,
        torch.randn(L, do, generator=g),
        torch.rand(L, 1, generator=g) + 0.5,  # scalar target scale
    )


def test_specs_registered():
    assert model_registry.get("clt").build_fn(_args("clt")).__class__ is CrossLayerTranscoder
    assert model_registry.get("plt").build_fn(_args("plt")).__class__ is PerLayerTranscoder


def test_args_from_job_config_and_dict_roundtrip():
    cfg = JobConfig()
    cfg.model.name, cfg.model.k, cfg.loss.decoder_norm = "plt", 7, "sum"
    a = TranscoderArgs.from_job_config(cfg, 2, 8, 9, [3, 5], "m", "resid_mid", "mlp_out")
    assert (a.family, a.n_layers, a.d_in, a.d_out, a.k, a.layers, a.decoder_norm) == (
        "plt",
        2,
        8,
        9,
        7,
        [3, 5],
        "sum",
    )
    assert TranscoderArgs.from_dict(a.to_dict()) == a
    cfg.loss.sparsity = "none"  # nothing needs decoder norms: forward skips them
    a2 = TranscoderArgs.from_job_config(cfg, 2, 8, 9, [3, 5], "m", "resid_mid", "mlp_out")
    assert a2.decoder_norm == "none"
    m = model_registry.get("plt").build_fn(a2)
    m.init_weights(0)
    assert m.forward_std(torch.randn(2, 2, 8)).dec_norms is None
    with pytest.raises(ValueError, match="unknown field"):
        TranscoderArgs.from_dict({**a.to_dict(), "bogus": 1})


def test_clt_with_zero_cross_blocks_equals_plt():
    clt = _build(_args("clt", act="jumprelu"))
    plt = _build(_args("plt", act="jumprelu"), seed=5)
    with torch.no_grad():
        for s, W in enumerate(clt.W_dec):
            W[:, 1:].zero_()  # keep only W_dec,s→s
            plt.W_dec[s].copy_(W[:, 0])
        plt.W_enc.copy_(clt.W_enc)
        plt.b_enc.copy_(clt.b_enc)
        plt.b_dec.copy_(clt.b_dec)
        plt.activation.log_threshold.copy_(clt.activation.log_threshold)
    x = torch.randn(7, 3, 4)
    a, b = clt.forward_std(x), plt.forward_std(x)
    assert b.acts.count_nonzero() > 0
    torch.testing.assert_close(a.acts, b.acts)
    torch.testing.assert_close(a.y_hat, b.y_hat)
    # one target per feature: both norm modes agree with the PLT's
    torch.testing.assert_close(clt.decoder_norms("concat"), plt.decoder_norms("concat"))
    torch.testing.assert_close(clt.decoder_norms("sum"), plt.decoder_norms("sum"))


def test_clt_decode_matches_float64_loop():
    m = _build(_args("clt", L=4, F=5, d_out=3, d_in=3))
    acts = torch.rand(6, 4, 5) * (torch.rand(6, 4, 5) > 0.5)
    y = m.decode_std(acts).double()
    ref = torch.zeros(6, 4, 3, dtype=torch.float64)
    for t in range(4):
        ref[:, t] = m.b_dec[t].double()
        for s in range(t + 1):
            ref[:, t] += acts[:, s].double() @ m.W_dec[s][:, t - s].double()  # W_dec,s→t [F, d]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_plt_matches_float64_reference():
    m = _build(_args("plt", d_out=5))
    x = torch.randn(6, 3, 4)
    h = torch.einsum("bld,lfd->blf", x.double(), m.W_enc.double()) + m.b_enc.double()
    y = torch.einsum("blf,lfd->bld", torch.relu(h), m.W_dec.double()) + m.b_dec.double()
    out = m.forward_std(x)
    torch.testing.assert_close(out.pre_acts.double(), h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.y_hat.double(), y, rtol=1e-5, atol=1e-5)


def test_clt_decoder_norms_by_hand():
    m = CrossLayerTranscoder(_args("clt", L=2, F=1, d_out=2, d_in=2))
    with torch.no_grad():
        m.W_dec[0].copy_(torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]))  # targets 0, 1: norms 5, 10
        m.W_dec[1].copy_(torch.tensor([[[1.0, 0.0]]]))
    torch.testing.assert_close(m.decoder_norms("concat"), torch.tensor([[math.sqrt(125.0)], [1.0]]))
    torch.testing.assert_close(m.decoder_norms("sum"), torch.tensor([[15.0], [1.0]]))
    with pytest.raises(ValueError, match="concat"):
        m.decoder_norms("max")


@pytest.mark.parametrize("family", ["plt", "clt"])
@pytest.mark.parametrize("act", ["relu", "jumprelu", "batchtopk"])
def test_fold_standardization_keeps_raw_outputs(family, act):
    m = _build(_args(family, act=act, d_out=5))
    _standardize(m)
    if act == "batchtopk":
        m.forward_std(torch.randn(16, 3, 4))  # sets a threshold
    m.eval()
    x = torch.randn(8, 3, 4) * 3 + 1
    acts, y, h = m.encode(x), m(x), m.pre_acts(m.standardize_in(x))
    assert acts.count_nonzero() > 0
    m.fold_standardization()
    for name, want in [("in_mean", 0.0), ("in_scale", 1.0), ("out_mean", 0.0), ("out_scale", 1.0)]:
        assert torch.equal(getattr(m, name), torch.full_like(getattr(m, name), want))
    torch.testing.assert_close(m.pre_acts(x), h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.encode(x), acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.decode(acts), y, rtol=1e-4, atol=1e-4)


def test_standardized_forward_matches_raw_api():
    m = _build(_args("clt"))
    _standardize(m)
    x = torch.randn(5, 3, 4)
    out = m.forward_std(m.standardize_in(x))
    torch.testing.assert_close(m.unstandardize_out(out.y_hat), m(x))
    torch.testing.assert_close(out.dec_norms, m.decoder_norms("concat"))


def test_set_standardization_rejects_nonpositive_scale():
    m = _build(_args("plt"))
    with pytest.raises(ValueError, match="positive"):
        m.set_standardization(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4))


@pytest.mark.parametrize("family", ["plt", "clt"])
@pytest.mark.parametrize("act", ACTS)
def test_meta_init_matches_cpu_init(family, act):
    args = _args(family, act=act)
    cpu = model_registry.get(family).build_fn(args)
    cpu.init_weights(11)
    with torch.device("meta"):
        meta = model_registry.get(family).build_fn(args)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(11)
    sd_cpu, sd_meta = cpu.state_dict(), meta.state_dict()
    assert sd_cpu.keys() == sd_meta.keys()
    for k in sd_cpu:
        assert torch.equal(sd_cpu[k], sd_meta[k]), k
    other = model_registry.get(family).build_fn(args)
    other.init_weights(12)
    assert not torch.equal(other.W_enc, cpu.W_enc)


def test_plt_init_defaults():
    m = _build(_args("plt", F=8), randomize_biases=False)
    torch.testing.assert_close(m.decoder_norms(), torch.full((3, 8), 0.1))
    assert torch.equal(m.W_enc, m.W_dec)  # tied: W_enc,l = W_dec,lᵀ in our [F, d] layout
    assert torch.equal(m.b_enc, torch.zeros(3, 8)) and torch.equal(m.b_dec, torch.zeros(3, 4))
    m2 = _build(_args("plt", F=8, decoder_init_norm=0.3, tied_init=False), randomize_biases=False)
    torch.testing.assert_close(m2.decoder_norms(), torch.full((3, 8), 0.3))
    assert m2.W_enc.abs().max() <= 1 / math.sqrt(8)
    assert not torch.equal(m2.W_enc, m2.W_dec)
    m3 = _build(_args("plt", d_out=5), randomize_biases=False)  # d_in != d_out: cannot tie
    assert m3.W_enc.shape == (3, 6, 4)


def test_clt_init_defaults():
    L, d = 3, 4
    m = _build(_args("clt", L=L, d_out=d, F=8), randomize_biases=False)
    bound = 1 / math.sqrt(L * d)
    for s, W in enumerate(m.W_dec):
        assert W.shape == (8, L - s, d)
        assert W.abs().max() <= bound
        assert torch.equal(m.W_enc[s], W[:, 0])  # tied to the source's own block
    m2 = _build(_args("clt", L=L, d_out=d, F=8, decoder_init_norm=0.5), randomize_biases=False)
    torch.testing.assert_close(m2.decoder_norms("concat"), torch.full((L, 8), 0.5))


def test_jumprelu_threshold_and_standardization_reset_by_init():
    with torch.device("meta"):
        m = model_registry.get("clt").build_fn(_args("clt", act="jumprelu"))
    m.to_empty(device="cpu")
    m.init_weights(0)
    torch.testing.assert_close(m.activation.feature_thresholds(), torch.full((3, 6), 0.05))
    assert torch.equal(m.in_scale, torch.ones(3, 4)) and torch.equal(m.out_mean, torch.zeros(3, 4))


@pytest.mark.parametrize("family", ["plt", "clt"])
def test_bf16_params_run(family):
    m = _build(_args(family, dtype="bfloat16"))
    assert m.W_enc.dtype == torch.bfloat16 and m.in_mean.dtype == torch.float32
    out = m.forward_std(torch.randn(4, 3, 4))
    assert out.y_hat.dtype == torch.bfloat16
    assert torch.isfinite(out.y_hat.float()).all()


@pytest.mark.parametrize("family", ["plt", "clt"])
def test_gradients_reach_every_parameter(family):
    m = _build(_args(family, act="jumprelu"))
    out = m.forward_std(torch.randn(32, 3, 4))
    (out.y_hat.pow(2).sum() + out.acts.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def _sharded_init_worker(rank: int, world: int, store_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from torchtitan_clt.checkpoint.export import export_native, load_pretrained
    from torchtitan_clt.models.common import _local_index, copy_full_

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        # copy_full_ writes this rank's slice: same local shard as distribute_tensor, uneven sizes too
        mesh1 = init_device_mesh("cpu", (2,))
        mesh2 = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        full = torch.arange(105.0).view(5, 3, 7)
        for mesh, placements in [
            (mesh1, [Shard(0)]),
            (mesh1, [Shard(1)]),
            (mesh1, [Shard(-1)]),
            (mesh1, [Replicate()]),
            (mesh2, [Shard(0), Shard(0)]),
            (mesh2, [Shard(1), Shard(2)]),
        ]:
            p = torch.nn.Parameter(distribute_tensor(torch.zeros(5, 3, 7), mesh, placements))
            assert _local_index(p) is not None
            copy_full_(p, full)
            assert torch.equal(p.to_local(), distribute_tensor(full, mesh, placements).to_local())
        # FSDP2 on a meta-built model: the same weights as a one-process init
        for family in ("clt", "plt"):
            args = _args(family, F=5, act="jumprelu")
            ref = model_registry.get(family).build_fn(args)
            ref.init_weights(7)
            with torch.device("meta"):
                m = model_registry.get(family).build_fn(args)
            fully_shard(m, mesh=mesh1)
            m.to_empty(device="cpu")
            m.init_weights(7)
            for name, p in m.named_parameters():
                assert isinstance(p, DTensor), name
                assert torch.equal(p.full_tensor(), ref.get_parameter(name)), name
            # the export gathers the shards on every rank; rank 0 alone writes
            folder = f"{store_path}-export-{family}"
            written = export_native(m, folder)
            assert (written is not None) == (rank == 0)
            dist.barrier()
            x = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(load_pretrained(folder)(x), ref.eval()(x))
    finally:
        dist.destroy_process_group()


def test_sharded_init_matches_single_process(tmp_path):
    """Two gloo ranks: DTensor / FSDP2 parameters get the one-process weights, and export them."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("needs torch.distributed")
    mp.spawn(_sharded_init_worker, args=(2, str(tmp_path / "store")), nprocs=2)
