"""The end of a run from the sharded model, on 4 gloo CPU ranks (tp=4, and dp_shard 2 × tp 2 with
FSDP2): the native and circuit-tracer exports streamed one source layer at a time equal, byte for
byte, what today's path writes (the model gathered whole onto rank 0 with ``gather_plain_model``,
folded, ``save_file``), and rank 0 receives one source layer of gathered weights at a time, the
other ranks none.

The reference is independent of the code under test: safetensors' own ``save_file`` on the
gathered copy, and circuit-tracer's exporter on that copy. The bound is measured by a spy on the
two gather functions (``sharded_export.gather_row`` / ``gather_whole``): every gathered tensor's
bytes count until the tensor is freed (``weakref.finalize``); over the export rank 0's peak must be
the largest source layer (``layer_bytes``), far below the whole model, and the others' zero.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from helpers import run_ranks, tiny_args

L, D, F = 6, 8, 16


def _spy_gathers(se) -> tuple[list[int], list[int]]:
    """Wrap the sharded export's gathers: ``live[0]`` is the gathered bytes alive on this rank now,
    ``peak[0]`` the most at once (received into memory: meta results count nothing)."""
    live, peak = [0], [0]

    def spy(fn):
        def gathered(*a):
            t = fn(*a)
            n = 0 if t.is_meta else t.numel() * t.element_size()  # meta: received nothing
            live[0] += n
            peak[0] = max(peak[0], live[0])
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - n))
            return t

        return gathered

    se.gather_row, se.gather_whole = spy(se.gather_row), spy(se.gather_whole)
    return live, peak


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _reference_model(family: str, in_mean_zero: bool):
    """The trained-like one-process model: perturbed weights and thresholds, skip path, and
    standardization (scales and output means; input means zero or not)."""
    from torchtitan_clt.protocols import model_registry

    args = tiny_args(family, "jumprelu", L=L, d=D, F=F, skip_connection=True, model_name="tiny")
    m = model_registry.get(family).build_fn(args)
    m.init_weights(3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    in_mean = torch.zeros(L, D) if in_mean_zero else torch.randn(L, D, generator=g)
    m.set_standardization(
        in_mean,
        torch.rand(L, D, generator=g) + 0.5,
        torch.randn(L, D, generator=g),
        torch.rand(L, D, generator=g) + 0.5,
    )
    return args, m


def _todays_native(plain, folder: Path, dtype: torch.dtype) -> None:
    """What ``export_native`` wrote before this change: the folded copy through ``save_file``."""
    from safetensors.torch import save_file

    from torchtitan_clt.checkpoint.export import FORMAT
    from torchtitan_clt.checkpoint.plain import folded_cpu_copy

    copy = folded_cpu_copy(plain)
    copy.to(dtype)
    folder.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in copy.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": FORMAT})


def _worker(rank: int, world: int, tmp: str, layout: str) -> None:
    import torch.distributed as dist
    from helpers import load_reference_
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from torchtitan_clt.checkpoint import sharded_export as se
    from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer
    from torchtitan_clt.checkpoint.export import export_native
    from torchtitan_clt.distributed.fsdp import apply_fsdp
    from torchtitan_clt.distributed.tensor_parallel import apply_tp
    from torchtitan_clt.protocols import model_registry
    from torchtitan_clt.trainer.finish import gather_plain_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    tmp = Path(tmp)
    live, peak = _spy_gathers(se)
    try:
        if layout == "tp4":
            mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        else:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        report = {}
        for family in ("clt", "plt"):
            spec = model_registry.get(family)
            for in_mean_zero in (True, False):
                args, ref = _reference_model(family, in_mean_zero)
                with torch.device("meta"):
                    model = spec.build_fn(args)
                apply_tp(model, mesh["tp"], spec.tp_plan)
                if layout != "tp4":
                    apply_fsdp(model, mesh["dp"], None)
                model.to_empty(device="cpu")
                load_reference_(model, ref)
                assert all(isinstance(p, DTensor) for p in model.parameters())
                case = f"{family}_{'mean0' if in_mean_zero else 'mean'}"
                out = tmp / str(rank) / case
                peak[0] = live[0] = 0
                export_native(model, out / "export", dtype=torch.float32, extra_meta={"step": 5})
                export_native(model, out / "export_bf16_sharded", dtype=torch.bfloat16, max_file_gb=2e-6)
                export_circuit_tracer(model, out / "circuit_tracer")
                plan = se.layer_plan(model)
                bound = max(se.layer_bytes(model, plan, j) for j in range(L))
                whole = sum(v.numel() * v.element_size() for v in ref.state_dict().values())
                report[case] = {"peak": peak[0], "bound": bound, "whole": whole, "live_after": live[0]}
                # today's path: the whole model gathered onto rank 0, then exported
                plain = gather_plain_model(model, spec, args, world)
                if rank == 0:
                    ref_dir = tmp / "ref" / case
                    _todays_native(plain, ref_dir / "export", torch.float32)
                    export_native(
                        plain, ref_dir / "export_bf16_sharded", dtype=torch.bfloat16, max_file_gb=2e-6
                    )
                    export_circuit_tracer(plain, ref_dir / "circuit_tracer")
                    export_native(
                        plain, ref_dir / "export_new_plain", dtype=torch.float32, extra_meta={"step": 5}
                    )
                dist.barrier()
        (tmp / f"report{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp4", "dp2_tp2"])
def test_streamed_exports_equal_the_gathered_ones_and_hold_one_layer(tmp_path, layout):
    from safetensors.torch import load_file

    from torchtitan_clt.checkpoint.export import load_pretrained

    run_ranks(_worker, (4, str(tmp_path), layout), 4)
    for case in ("clt_mean0", "clt_mean", "plt_mean0", "plt_mean"):
        got, want = tmp_path / "0" / case, tmp_path / "ref" / case
        exact = case.endswith("mean0")
        # circuit-tracer: one file per layer already, each equal to the gathered export's
        g, w = _files(got / "circuit_tracer"), _files(want / "circuit_tracer")
        assert g.keys() == w.keys()
        # native, one file: today's bytes (the config as the plain path writes it)
        assert _files(got / "export")["config.json"] == _files(want / "export_new_plain")["config.json"]
        gs, ws = _files(got / "export_bf16_sharded"), _files(want / "export_bf16_sharded")
        assert gs.keys() == ws.keys() and "model.safetensors.index.json" in gs and len(gs) > 4, sorted(gs)
        if exact:
            assert g == w, [k for k in g if g[k] != w[k]]
            assert _files(got / "export")["model.safetensors"] == _files(want / "export")["model.safetensors"]
            assert gs == ws, [k for k in gs if gs[k] != ws[k]]
        else:  # b_enc / b_dec's sums over d_in: per layer vs batched, last-bit rounding at most
            a = load_file(str(got / "export" / "model.safetensors"))
            b = load_file(str(want / "export" / "model.safetensors"))
            for k in b:
                torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
                if k not in ("b_enc", "b_dec"):
                    assert torch.equal(a[k], b[k]), k
        x = torch.randn(5, L, D)
        torch.testing.assert_close(
            load_pretrained(got / "export_bf16_sharded")(x),
            load_pretrained(want / "export_bf16_sharded")(x),
            rtol=0,
            atol=0 if exact else 1e-2,
        )
    for rank in range(4):
        for case, r in json.loads((tmp_path / f"report{rank}.json").read_text()).items():
            # rank 0 receives one source layer at a time (all of layer 0 once); the others nothing
            assert r["peak"] == (r["bound"] if rank == 0 else 0), (rank, case, r)
            assert r["whole"] > 3 * r["bound"], r  # the bound is a real one: the model is far bigger
            assert r["live_after"] == 0, r  # nothing gathered outlives the export


def _batchtopk_worker(rank: int, world: int, tmp: str) -> None:
    """BatchTopK (scope ``all`` and ``layer``): the inference-threshold fit and the circuit-tracer
    conversion from the shards vs on the gathered copy, with the gathered-bytes spy on."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_clt.checkpoint import sharded_calibration as sc
    from torchtitan_clt.checkpoint import sharded_export as se
    from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer
    from torchtitan_clt.distributed.tensor_parallel import apply_tp
    from torchtitan_clt.models.common import copy_full_
    from torchtitan_clt.models.conversion import fit_batchtopk_threshold
    from torchtitan_clt.protocols import model_registry
    from torchtitan_clt.trainer.finish import gather_plain_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=world)
    tmp = Path(tmp)
    live, peak = _spy_gathers(se)
    try:
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        g = torch.Generator().manual_seed(21)
        calib = [(torch.randn(24, L, D, generator=g), torch.randn(24, L, D, generator=g)) for _ in range(2)]
        report = {}
        for scope in ("all", "layer"):
            spec = model_registry.get("clt")
            args = tiny_args("clt", "batchtopk", L=L, d=D, F=F, skip_connection=True, batchtopk_scope=scope)
            ref = spec.build_fn(args)
            ref.init_weights(3)
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
            ref.set_standardization(torch.zeros(L, D), torch.rand(L, D, generator=g) + 0.5,
                                    torch.randn(L, D, generator=g), torch.rand(L, D, generator=g) + 0.5)  # fmt: skip
            with torch.device("meta"):
                model = spec.build_fn(args)
            apply_tp(model, mesh["tp"], spec.tp_plan)
            model.to_empty(device="cpu")
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, p in ref.state_dict().items():
                    copy_full_(params[name], p) if name in params else model.get_buffer(name).copy_(p)
            plain = gather_plain_model(model, spec, args, world)  # before the fit: the reference's input
            peak[0] = live[0] = 0
            fit = sc.fit_batchtopk(se.LayerStream(model), calib)
            export_circuit_tracer(model, tmp / str(rank) / scope, calibration=calib)
            bound = max(se.layer_bytes(model, se.layer_plan(model), j) for j in range(L))
            report[scope] = {"peak": peak[0], "bound": bound, "live_after": live[0], "fit": fit}
            if rank == 0:
                report[scope]["ref_fit"] = fit_batchtopk_threshold(plain, calib)
                export_circuit_tracer(plain, tmp / "ref" / scope, calibration=calib)
            dist.barrier()
        (tmp / f"report{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batchtopk_fit_and_conversion_from_the_shards(tmp_path):
    from safetensors.torch import load_file

    run_ranks(_batchtopk_worker, (4, str(tmp_path)), 4)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(4)]
    for scope in ("all", "layer"):
        r0 = reports[0][scope]
        assert all(r[scope]["fit"] == r0["fit"] for r in reports)  # every rank got rank 0's fit
        for key in ("tokens", "k", "scope", "tracked_ema"):
            assert r0["fit"][key] == r0["ref_fit"][key], key
        torch.testing.assert_close(
            torch.tensor(r0["fit"]["threshold"]), torch.tensor(r0["ref_fit"]["threshold"])
        )
        assert (
            len(set(r0["fit"]["threshold"])) == (1 if scope == "all" else L)
            and min(r0["fit"]["threshold"]) > 0
        )
        for rank, r in enumerate(reports):
            # rank 0 == : layer 0 (W_dec.0 whole) came through the stream, so the conversion streamed
            assert r[scope]["peak"] == (r[scope]["bound"] if rank == 0 else 0), (rank, r[scope])
            assert r[scope]["live_after"] == 0, r[scope]
        got, want = tmp_path / "0" / scope, tmp_path / "ref" / scope
        assert _files(got).keys() == _files(want).keys()
        a, b = (json.loads((f / "conversion.json").read_text()) for f in (got, want))
        assert list(a) == list(b)
        for k in b:
            if isinstance(b[k], float) or isinstance(b[k], list):
                torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(b[k]), rtol=1e-4, atol=1e-6)
            else:
                assert a[k] == b[k], k
        assert a["l0_before"] == b["l0_before"] and a["l0_after"] == b["l0_after"]  # counts, exactly
        for j in range(L):
            for f in (f"W_enc_{j}.safetensors", f"W_dec_{j}.safetensors"):
                ta, tb = load_file(str(got / f)), load_file(str(want / f))
                for k in tb:
                    if k.startswith("threshold"):
                        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-7)
                    else:
                        assert torch.equal(ta[k], tb[k]), (scope, f, k)
