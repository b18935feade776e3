"""Per-shard init (models/init.py): each rank draws only its shard, the weights do not depend on the
mesh, and no rank allocates more than its shard plus O(chunk) while initialising.

References are independent of the code under test: a box of a virtual tensor against a slice of
the whole tensor, ``shard_box`` against ``DTensor.full_tensor()`` on a real gloo mesh (Shard,
Replicate, FSDP2's _StridedShard, HSDP) and against torch's own local-offset arithmetic on a fake
mesh, and memory against a TorchDispatchMode that counts the bytes of every live storage created
during ``init_weights`` (freed when the storage dies).
"""

from __future__ import annotations

import math
import os
import random
import weakref

import pytest
import torch
from helpers import tiny_args
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_clt.models import init as I
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs


def _slice(t, box):
    return t[tuple(slice(lo, hi) for lo, hi in box)]


def _random_box(shape, rng):
    box = []
    for n in shape:
        lo = rng.randrange(n)
        box.append((lo, rng.randrange(lo + 1, n + 1)))
    return tuple(box)


def test_flat_blocks_tile_the_range():
    for shape in [(5, 3, 7), (4, 9), (2, 3, 4, 5), (13,)]:
        flat = torch.arange(math.prod(shape))
        for a in range(0, flat.numel(), 3):
            for b in range(a, flat.numel() + 1, 5):
                parts = [_slice(flat.view(shape), blk).flatten() for blk in I._flat_blocks(a, b, shape)]
                got = torch.cat(parts) if parts else flat[:0]
                assert torch.equal(got, flat[a:b]), (shape, a, b)


def test_any_box_is_the_slice_of_the_whole_tensor(monkeypatch):
    """Chunks of 37 elements cut rows anywhere: boxes, row norms, tied blocks and MOLT scales read
    from the virtual tensors equal the slices of the tensor read whole (bitwise, fp32 and bf16)."""
    monkeypatch.setattr(I, "INIT_CHUNK", 37)
    rng = random.Random(0)
    shape = (4, 6, 5)
    U, V = I.Drawn(1, "U", (2, 5, 3, 4), "normal", 1.0), I.Drawn(1, "V", (2, 5, 3, 6), "normal", 0.4)
    decs = [
        I.RowNormalized(I.Drawn(2, f"W_dec.{s}", (6, 3 - s, 5), "uniform", 0.3), 1, 0.7) for s in range(3)
    ]
    cases = [
        I.Drawn(3, "u", shape, "uniform", 0.5),
        I.RowNormalized(I.Drawn(3, "n", shape, "normal", 1.0), 1, 2.0),
        I.RowNormalized(I.Drawn(3, "m", shape, "normal", 1.0), 2, 0.1),
        I.FirstTarget(decs),
        I.TransformScaled(U, V, 1.5),
    ]
    for v in cases:
        whole = v.read(I.full_box(v.shape))
        for _ in range(25):
            box = _random_box(v.shape, rng)
            assert torch.equal(v.read(box), _slice(whole, box)), (type(v).__name__, box)
            out = torch.empty([hi - lo for lo, hi in box], dtype=torch.bfloat16)
            v.fill_(out, box)
            assert torch.equal(out, _slice(whole, box).bfloat16()), (type(v).__name__, box)
    # the distributions: bounds, row norms, tied blocks, ‖U_j V_j‖_F
    assert cases[0].read(I.full_box(shape)).abs().max() <= 0.5
    torch.testing.assert_close(cases[1].read(I.full_box(shape)).flatten(1).norm(dim=1), torch.full((4,), 2.0))
    torch.testing.assert_close(cases[2].read(I.full_box(shape)).norm(dim=2), torch.full((4, 6), 0.1))
    enc = cases[3].read(I.full_box(cases[3].shape))
    for s in range(3):
        assert torch.equal(enc[s], decs[s].read(I.full_box(decs[s].shape))[:, 0])
    Uw, Vw = cases[4].read(I.full_box(U.shape)), V.read(I.full_box(V.shape))
    prod = torch.einsum("lnro,lnri->lnoi", Uw, Vw)
    torch.testing.assert_close(prod.flatten(2).norm(dim=2), torch.full((2, 5), 1.5))


@pytest.mark.parametrize("family", ["clt", "plt", "molt", "sae"])
def test_init_defaults_kept(family):
    """The docstrings' distributions: CLT U(±1/sqrt(L·d)) tied to W_dec,s→s; PLT/SAE rows of norm
    0.1 tied W_enc = W_dec; MOLT gates of norm 0.1 and ‖U_j V_j‖_F = 1."""
    a = tiny_args(family, "jumprelu", L=3, d=8, F=9)
    m = model_registry.get(family).build_fn(a)
    m.init_weights(5)
    assert torch.equal(m.b_enc, torch.zeros(3, 9)) and torch.equal(m.b_dec, torch.zeros(3, 8))
    torch.testing.assert_close(m.activation.threshold(), torch.full((3, 9), 0.05))
    if family == "clt":
        for s, W in enumerate(m.W_dec):
            assert W.abs().max() <= 1 / math.sqrt(3 * 8) and W.std() > 0.3 / math.sqrt(3 * 8)
            assert torch.equal(m.W_enc[s], W[:, 0])
    elif family == "molt":
        torch.testing.assert_close(m.W_enc.norm(dim=-1), torch.full((3, 9), 0.1))
        torch.testing.assert_close(m.transform_norms(), torch.ones(3, 9))
    else:
        torch.testing.assert_close(m.decoder_norms(), torch.full((3, 9), 0.1))
        assert torch.equal(m.W_enc, m.W_dec)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode and still alive; ``peak`` their maximum.
    Storages an op received (in-place writes, views of a parameter) are not new and not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in seen or key in self.live or st.nbytes() == 0:
                continue
            self.live[key] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(st, self._free, key)
        return out


def test_live_bytes_sees_a_full_tensor():
    with LiveBytes() as mem:
        x = torch.randn(1000, 100)
        y = x[:10].clone()
        del x
    assert mem.peak >= 400_000 and mem.now == y.numel() * 4


# --- a real gloo mesh: boxes equal DTensor's own layout, models equal one process -----------------


def _gloo_worker(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    I.INIT_CHUNK = 37  # chunks cut rows and shards anywhere
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
        full = torch.arange(12 * 5 * 7.0).view(12, 5, 7)
        for placements in [
            [Shard(0), Shard(0)],
            [Shard(1), Shard(0)],
            [Replicate(), Shard(2)],
            [Shard(0), Replicate()],
        ]:
            dt = distribute_tensor(full, mesh, placements)
            assert torch.equal(_slice(full, I.shard_box(dt)), dt.to_local()), placements
        for shape in [(12, 5, 7), (5, 12, 7), (3, 8, 4)]:  # FSDP2 over tp (strided), HSDP; uneven dp
            for tp_dim in (0, 1):
                m = torch.nn.Module()
                m.w = torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh["tp"], [Shard(tp_dim)]))
                fully_shard(m, mesh=mesh["dp"])
                assert torch.equal(_slice(m.w.full_tensor(), I.shard_box(m.w)), m.w.to_local()), (
                    m.w.placements
                )
            m = torch.nn.Module()
            m.w = torch.nn.Parameter(torch.randn(shape))
            fully_shard(m, mesh=hsdp)
            assert torch.equal(_slice(m.w.full_tensor(), I.shard_box(m.w)), m.w.to_local()), m.w.placements
        # whole models on dp2×tp2 (CLT / PLT / MOLT / Matryoshka, tp then FSDP2) and HSDP 2×2 (MOLT): one process's bits
        from torchtitan_clt.distributed.fsdp import apply_fsdp
        from torchtitan_clt.distributed.tensor_parallel import apply_tp
        from torchtitan_clt.models.clt import CLT_TP_PLAN
        from torchtitan_clt.models.molt import MOLT_TP_PLAN
        from torchtitan_clt.models.plt import PLT_TP_PLAN

        for family, plan, kw in [
            ("clt", CLT_TP_PLAN, {}),
            ("clt", CLT_TP_PLAN, {"decoder_init_norm": 0.3}),
            ("plt", PLT_TP_PLAN, {}),
            ("molt", None, {}),
            ("molt", MOLT_TP_PLAN, {"extra": {"molt_ranks": [3, 2], "molt_counts": [2, 6]}}),
            ("matryoshka_clt", CLT_TP_PLAN, {"act": "batchtopk"}),
        ]:
            args = tiny_args(family, kw.pop("act", "jumprelu"), L=3, d=6, F=8, **kw)
            spec = model_registry.get(family)
            ref = spec.build_fn(args)
            ref.init_weights(7)
            with torch.device("meta"):
                model = spec.build_fn(args)
            if plan is not None:
                apply_tp(model, mesh["tp"], plan)
            apply_fsdp(model, mesh["dp"] if plan is not None else hsdp, None)
            model.to_empty(device="cpu")
            model.init_weights(7)
            for name, p in model.named_parameters():
                assert isinstance(p, DTensor), name
                assert torch.equal(p.full_tensor(), ref.get_parameter(name)), (family, kw, name)
    finally:
        dist.destroy_process_group()


def test_boxes_and_models_match_on_gloo_mesh(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("needs torch.distributed")
    mp.spawn(_gloo_worker, args=(4, str(tmp_path / "store")), nprocs=4)


# --- clt_8b on a fake mesh of 32 ranks: the real shapes' boxes, and a twin's memory and values -----

CLT_8B = {"n_layers": 32, "features_per_layer": 32768, "d": 4096}
TWIN = {"n_layers": 32, "features_per_layer": 1024, "d": 64}
TWIN_CHUNK = 1 << 14  # a full W_dec[0] of the twin is 128 chunks
MESHES = {"tp32": (1, 1, 32), "dp2xtp16": (1, 2, 16)}  # (dp_replicate, dp_shard, tp)


def _clt_args(n_layers, features_per_layer, d, **kw):
    return TranscoderArgs(
        family="clt", n_layers=n_layers, d_in=d, d_out=d, features_per_layer=features_per_layer,
        activation="batchtopk", batchtopk_scope="all", k=64, **kw,
    )  # fmt: skip


_REF: dict[str, torch.Tensor] = {}  # the one-process twin, inherited by the forked ranks


def _simulated_rank(rank: int, layout, args: TranscoderArgs, materialize: bool, world: int = 32) -> dict:
    """One rank of a 32-rank fake process group (in a forked child): the trainer's order, meta
    build -> parallelize_model -> to_empty -> init_weights under LiveBytes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    try:  # torch's own arithmetic (private): an independent reference for the boxes
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as torch_offsets
    except ImportError:  # pragma: no cover - moved in another torch release
        torch_offsets = None

    from torchtitan_clt.config import JobConfig
    from torchtitan_clt.distributed.parallel_dims import ParallelDims
    from torchtitan_clt.distributed.parallelize import parallelize_model

    torch.set_num_threads(1)
    I.INIT_CHUNK = TWIN_CHUNK
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    R, S, T = layout
    dims = ParallelDims(dp_replicate=R, dp_shard=S, tp=T, world_size=world)
    dims.build_mesh("cpu")
    cfg = JobConfig()
    cfg.training.device, cfg.model.name = "cpu", "clt"
    cfg.parallelism.dp_replicate, cfg.parallelism.dp_shard, cfg.parallelism.tp = R, S, T
    spec = model_registry.get("clt")
    with torch.device("meta"):
        model = spec.build_fn(args)
    model = parallelize_model(model, spec, dims, cfg)
    res = {"boxes": {}, "shard_bytes": 0}
    for name, p in model.named_parameters():
        box = I.shard_box(p)
        shape = tuple(p.to_local().shape)
        if torch_offsets is not None:
            t_shape, offset = torch_offsets(p.shape, p.device_mesh, p.placements)
            assert tuple(t_shape) == shape, (name, t_shape, box)
            if all(shape):
                assert tuple(offset) == tuple(lo for lo, _ in box), (name, offset, box)
        res["boxes"][name] = box
        res["shard_bytes"] += math.prod(shape) * 4
    if materialize:
        model.to_empty(device="cpu")
        with LiveBytes() as mem:
            model.init_weights(11)
        res["peak"] = mem.peak
        for name, p in model.named_parameters() if world == 32 else []:
            assert torch.equal(p.to_local(), _slice(_REF[name], res["boxes"][name])), (rank, name)
    dist.destroy_process_group()
    return res


_WARM = []


def _warm_up() -> None:
    """Run the whole path once in this process on a 4-rank fake mesh, so that the forked ranks
    start with torch's lazy imports done (DTensor's caches are keyed by mesh: entries for this
    4-rank mesh cannot answer for the 32-rank ones)."""
    if not _WARM:
        chunk, threads = I.INIT_CHUNK, torch.get_num_threads()
        try:
            _simulated_rank(0, (1, 2, 2), _clt_args(2, 4, 4), True, world=4)
        finally:
            I.INIT_CHUNK = chunk
            torch.set_num_threads(threads)
        _WARM.append(True)


def _fork_ranks(layout, args, materialize) -> list[dict]:
    import multiprocessing as mp

    _warm_up()
    ctx = mp.get_context("fork")
    with ctx.Pool(min(2, os.cpu_count() or 1), maxtasksperchild=1) as pool:
        jobs = [pool.apply_async(_simulated_rank, (r, layout, args, materialize)) for r in range(32)]
        return [j.get(timeout=600) for j in jobs]


def _assert_tiling(results, shapes, replicas):
    for name, shape in shapes.items():
        boxes = [r["boxes"][name] for r in results]
        cover = torch.zeros(shape, dtype=torch.int16) if math.prod(shape) < 1e8 else None
        if cover is not None:
            for box in boxes:
                _slice(cover, box).add_(1)
            assert bool((cover == replicas[name]).all()), name
        else:  # the real clt_8b shapes: volumes, and disjoint boxes
            total = sum(math.prod(hi - lo for lo, hi in box) for box in boxes)
            assert total == math.prod(shape) * replicas[name], name
            assert replicas[name] == 1, name
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    assert any(min(p[1], q[1]) <= max(p[0], q[0]) for p, q in zip(a, b)), (name, a, b)


@pytest.mark.parametrize("layout", list(MESHES))
def test_clt_8b_shapes_on_fake_32_rank_mesh(layout):
    """The real clt_8b shapes (75 B parameters) on meta: every rank's box is torch's local shard,
    and the 32 boxes tile every parameter (replicated ones once per rank of the replica group)."""
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("needs fork")
    args = _clt_args(**CLT_8B)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in model_registry.get("clt").build_fn(args).named_parameters()}
    results = _fork_ranks(MESHES[layout], args, materialize=False)
    R, S, T = MESHES[layout]
    replicas = {n: 32 if n == "b_dec" else 1 for n in shapes}
    if S > 1:
        replicas["b_dec"] = 32 // S  # FSDP shards b_dec over dp_shard, replicated over tp
    _assert_tiling(results, shapes, replicas)
    full_w0, shard = math.prod(shapes["W_dec.0"]) * 4, max(r["shard_bytes"] for r in results)
    print(
        f"clt_8b {layout}: full W_dec[0] {full_w0 / 1e9:.1f} GB, largest rank's fp32 shard {shard / 1e9:.2f} GB"
    )
    assert full_w0 > 17e9 and shard < 9.5e9


@pytest.mark.parametrize("layout", list(MESHES))
def test_clt_8b_twin_each_rank_allocates_only_its_shard(layout):
    """A twin of clt_8b (32 layers, BatchTopK across layers, tp=32 or dp_shard=2 × tp=16, F=1024,
    d=64; W_dec[0] alone is 128 chunks): each of the 32 simulated ranks allocates at most a few
    chunks during init_weights (its shard is already there after to_empty), and its shards equal
    the slices of a one-process init, bit for bit."""
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("needs fork")
    saved = I.INIT_CHUNK
    I.INIT_CHUNK = TWIN_CHUNK
    try:
        args = _clt_args(**TWIN, decoder_init_norm=0.5 if layout == "dp2xtp16" else 0.0)
        one = model_registry.get("clt").build_fn(args)
        one.init_weights(11)
        ref = {n: p.detach() for n, p in one.named_parameters()}
        _REF.update(ref)
        results = _fork_ranks(MESHES[layout], args, materialize=True)
    finally:
        I.INIT_CHUNK = saved
        _REF.clear()
    full_w0 = ref["W_dec.0"].numel() * 4
    bound = 4 * TWIN_CHUNK * 4 + 64 * 1024  # a chunk in fp32 and its squares in fp64, row sums
    peaks, shards = [r["peak"] for r in results], [r["shard_bytes"] for r in results]
    print(f"{layout}: init allocates at most {max(peaks)} B on a rank (bound {bound}) beside its shard "
          f"of {max(shards)} B; full W_dec[0] {full_w0} B, chunk {TWIN_CHUNK * 4} B")  # fmt: skip
    assert max(peaks) <= bound < full_w0 / 20
    assert max(peaks) >= TWIN_CHUNK * 4  # the tracker saw the chunks
