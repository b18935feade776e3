"""The ``code`` tensor-parallel layout's pieces on two gloo ranks (``distributed/tp_code.py``):
the gather of the selected entries against hand-worked ids and gradients; a CLT sharded by
``apply_tp_code`` against the same model in one process for the decoder norms (both modes, and
their gradients), the public ``forward`` / ``decode`` (whole raw ŷ, with a skip path and
standardization), the unit-norm decoder constraint (rows split over d_out) and the bytes formula.
The end-to-end training equality lives in tests/integration/test_parallel_code.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import free_port, run_ranks


def _check_gather(rank: int) -> None:
    from torchtitan_clt.distributed.tp_code import gather_code

    # 2 rows, 1 layer, 3 local features per rank; rank 0 holds global ids 0..2, rank 1 ids 3..5.
    if rank == 0:
        idx = torch.tensor([[[0, 2]], [[1, -1]]])
        vals = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]], requires_grad=True)
    else:  # a wider local row than rank 0's: widths differ between ranks
        idx = torch.tensor([[[1, -1, -1]], [[0, 1, 2]]])
        vals = torch.tensor([[[4.0, 0.0, 0.0]], [[5.0, 6.0, 7.0]]], requires_grad=True)
    got_vals, got_idx = gather_code(vals, idx, 3, dist.group.WORLD)
    want_idx = torch.tensor([[[0, 2, 4, -1]], [[1, 3, 4, 5]]])
    want_vals = torch.tensor([[[1.0, 2.0, 4.0, 0.0]], [[3.0, 5.0, 6.0, 7.0]]])
    assert torch.equal(got_idx, want_idx), got_idx
    assert torch.equal(got_vals.detach(), want_vals), got_vals
    # Rank r's loss weighs entry (row, id) by c_r * w[id]: the gradient at an entry is (c_0 + c_1) w.
    w = torch.arange(1.0, 7.0)
    c = 1.0 if rank == 0 else 10.0
    (c * (got_vals * torch.where(got_idx >= 0, w[got_idx.clamp(min=0)], 0.0)).sum()).backward()
    gid = torch.where(idx >= 0, idx + 3 * rank, 0)
    want_grad = torch.where(idx >= 0, 11.0 * w[gid], 0.0)
    assert torch.equal(vals.grad, want_grad), (vals.grad, want_grad)


def _clt_pair(rank: int, world: int, d: int):
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_clt.distributed.tp_code import apply_tp_code
    from torchtitan_clt.models.clt import CLT_TP_CODE_PLAN, build_clt
    from torchtitan_clt.protocols.transcoder import MeshGroups, TranscoderArgs

    args = TranscoderArgs(
        family="clt", n_layers=3, d_in=d, d_out=d, features_per_layer=8, activation="topk", k=2,
        skip_connection=True,
    )  # fmt: skip
    ref, model = build_clt(args), build_clt(args)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        ref.set_standardization(
            torch.randn(3, d, generator=g), torch.rand(3, d, generator=g) + 0.5,
            torch.randn(3, d, generator=g), torch.rand(3, d, generator=g) + 0.5,
        )  # fmt: skip
    model.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    apply_tp_code(model, mesh, CLT_TP_CODE_PLAN)
    model.set_mesh_groups(
        MeshGroups(
            batch=dist.group.WORLD,
            features=mesh.get_group(),
            feature_shards=world,
            sum_decoder_partials=False,
        )
    )
    return ref, model


def _check_model(rank: int, world: int) -> None:
    from torchtitan_clt.components.decoder_constraint import UnitNormDecoder

    d, f_loc = 8, 8 // world
    ref, model = _clt_pair(rank, world, d)
    fs = slice(rank * f_loc, (rank + 1) * f_loc)
    ds = slice(rank * d // world, (rank + 1) * d // world)
    for mode in ("concat", "sum"):
        want = ref.decoder_norms(mode)
        got = model.decoder_norms(mode)
        assert torch.allclose(got, want[:, fs], rtol=1e-6), mode
        # Gradient: every rank's columns of W_dec get the gradient of the sum of its features' terms.
        scale = torch.arange(1.0, 9.0)
        (want * scale).sum().backward()
        (got * scale[fs]).sum().backward()
        for s in range(3):
            g_ref = ref.W_dec[s].grad[..., ds]
            assert torch.allclose(model.W_dec[s].grad.to_local(), g_ref, rtol=1e-5, atol=1e-6), (mode, s)
        ref.zero_grad(), model.zero_grad()
    x = torch.randn(5, 3, d, generator=torch.Generator().manual_seed(4))
    model.eval(), ref.eval()
    assert torch.allclose(model(x), ref(x), rtol=1e-5, atol=1e-5)
    acts = ref.encode(x)
    got = model.decode(acts[..., fs].contiguous(), x)
    assert got.shape == (5, 3, d) and torch.allclose(got, ref.decode(acts, x), rtol=1e-5, atol=1e-5)
    # The unit-norm constraint on rows split over d_out: project, step, normalize as one process.
    rows_ref, rows = UnitNormDecoder(ref.decoder_rows()), UnitNormDecoder(model.decoder_rows())
    g = torch.Generator().manual_seed(5)
    for p_ref, p in zip(ref.W_dec, model.W_dec):
        p_ref.grad = torch.randn(p_ref.shape, generator=g)
        p.grad = torch.distributed.tensor.distribute_tensor(p_ref.grad.clone(), p.device_mesh, p.placements)
    rows_ref.project_grads(), rows.project_grads()
    rows_ref.normalize(), rows.normalize()
    for p_ref, p in zip(ref.W_dec, model.W_dec):
        assert torch.allclose(p.grad.to_local(), p_ref.grad[..., ds], rtol=1e-5, atol=1e-6)
        assert torch.allclose(p.to_local(), p_ref.detach()[..., ds], rtol=1e-5, atol=1e-6)


def _worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if world == 2:
            _check_gather(rank)
        _check_model(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_code_layout_pieces_match_one_process(world):
    run_ranks(_worker, (world, free_port()), world)


def test_step_bytes_formula():
    """Hand-worked: clt_8b's shapes (B 4096, L 32, d 4096, k 64, tp 32)."""
    from torchtitan_clt.distributed.tp_code import step_bytes

    b = step_bytes(4096, 32, 4096, 64, 32)
    assert b["features"] == 2 * 31 / 32 * 4096 * 32 * 4096 * 4  # 3.875 GiB, the fp32 ring all-reduce
    assert b["code"] == 31 / 32 * 4096 * 32 * 64 * (12 + 4)  # gather 12 B / entry, reduce-scatter 4 B
    assert b["code"] / b["features"] < 1 / 30
