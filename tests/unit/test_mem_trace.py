"""The dry run's counter (tools/mem_trace.MemTracer) against hand-worked bytes, and the traced
trainer (scripts/dry_run.trace) against the formulas its layout implies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
MiB = 2**20


def test_live_bytes_peaks_and_phases_on_real_tensors():
    from torchtitan_clt.tools.mem_trace import MemTracer

    with MemTracer() as tr:
        a = torch.empty(MiB, dtype=torch.uint8)  # 1 MiB
        view = a[: MiB // 2]  # a view: the same storage, counted once
        assert tr.current["host"] == MiB
        with tr.phase("work") as st:
            b = torch.empty(3 * MiB, dtype=torch.uint8)
            del b  # freed: 4 MiB was the peak
            c = torch.empty(MiB // 4, dtype=torch.float32)  # 1 MiB
        assert st.peak["host"] == 4 * MiB and st.rise["host"] == 3 * MiB and st.entries == 1
        assert tr.current["host"] == 2 * MiB
        del a
        assert tr.current["host"] == 2 * MiB  # the view keeps the storage alive
        del view, c
    assert tr.current["host"] == 0
    assert tr.phases["other"].peak["host"] >= 2 * MiB


def test_an_entrys_transient_is_what_it_frees_before_it_ends():
    """``transient``: the most one entry rose above what it left live (a refill's extraction, which
    a real run overlaps with the step); ``last_*``: the latest entry's traffic alone."""
    from torchtitan_clt.tools.mem_trace import MemTracer

    kept = []
    with MemTracer() as tr:
        for scratch, keep in ((3, 1), (1, 2)):  # MiB used only inside, MiB left behind
            with tr.phase("refill") as st:
                tmp = torch.empty(scratch * MiB, dtype=torch.uint8)
                kept.append(torch.empty(keep * MiB, dtype=torch.uint8))
                tmp.fill_(1)
                del tmp
        assert st.entries == 2 and st.transient["host"] == 3 * MiB  # the first: 4 up, 1 left
        assert st.rise["host"] == 4 * MiB
        assert st.last_h2d_bytes == 0 and dict(st.last_collectives) == {}
    del kept


def test_a_cpu_sum_of_a_mask_counts_its_int64_copy():
    """A CPU ``sum`` of a bool mask copies it into int64 first (no output shows it): the tracer
    counts that copy as a transient; a float sum copies nothing."""
    from torchtitan_clt.tools.mem_trace import MemTracer

    n = MiB
    with MemTracer() as tr:
        m = torch.zeros(n, dtype=torch.bool)  # 1 MiB
        with tr.phase("count") as st:
            m.sum()
            m.sum(0, dtype=torch.int32)
        with tr.phase("float") as fl:
            torch.ones(n).sum()
    assert st.peak["host"] == n + 8 * n  # the mask and its int64 copy (before the result exists)
    assert fl.rise["host"] == 4 * n + 4  # the ones and the result, no copy
    del m


def _dtensor_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from torchtitan_clt.tools.mem_trace import MemTracer

    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = DTensor.from_local(torch.zeros(MiB // 4), mesh, [Shard(0)])
        with MemTracer() as tr:
            state = torch.zeros_like(p)  # made inside DTensor's dispatch, as AdamW's state is
            live = tr.current["host"]
            del state
            freed = tr.current["host"]
        torch.save((live, freed), f"{folder}/out.pt")
    finally:
        dist.destroy_process_group()


def test_a_dtensors_local_tensor_made_inside_its_dispatch_is_counted(tmp_path):
    """The optimizer's state of tensor-parallel parameters is made by ``zeros_like`` on DTensors:
    their local tensors come from inside the subclass's dispatch, which the mode does not see."""
    from helpers import run_ranks

    run_ranks(_dtensor_worker, (str(tmp_path),), 1)
    live, freed = torch.load(tmp_path / "out.pt")
    assert live == MiB and freed == 0


def test_what_holds_the_peak():
    from torchtitan_clt.tools.mem_trace import MemTracer

    keep: dict[str, torch.Tensor] = {}
    with MemTracer(holders={"weights": lambda: [keep["w"]]}) as tr:
        keep["w"] = torch.empty(2 * MiB, dtype=torch.uint8)
        with tr.phase("step") as st:
            tmp = torch.empty(5 * MiB, dtype=torch.uint8)
            del tmp
    held = st.at_peak["host"]
    assert held["weights"] == 2 * MiB and held["transients"] == 5 * MiB


def _make_big() -> torch.Tensor:
    return torch.empty(3 * MiB, dtype=torch.uint8)


def test_transients_at_the_peak_are_named_by_where_they_were_allocated():
    from torchtitan_clt.tools.mem_trace import MemTracer

    keep: dict[str, torch.Tensor] = {}
    with MemTracer(holders={"weights": lambda: [keep["w"]]}, site_bytes=MiB) as tr:
        keep["w"] = torch.empty(2 * MiB, dtype=torch.uint8)  # held: not a transient
        with tr.phase("step") as st:
            big = _make_big()
            small = torch.empty(MiB // 2, dtype=torch.uint8)  # under site_bytes: not named
            del big, small
    sites = st.transient_sites["host"]
    assert list(sites.values()) == [3 * MiB]
    (where,) = sites
    assert where.startswith("test_mem_trace.py:") and "_make_big" in where.split(" < ")[0]
    assert st.at_peak["host"]["transients"] == 3 * MiB + MiB // 2
    assert id(keep["w"].untyped_storage()) in tr.sites
    assert len(tr.sites) == 1  # the freed ones are forgotten; the held one (w) stays


def test_host_to_device_and_collective_bytes_follow_the_ring_formulas():
    """On a fake process group of 4 ranks: what rank 0 sends per collective (ring algorithms)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchtitan_clt.tools.fake_world import fake_process_group
    from torchtitan_clt.tools.mem_trace import MemTracer

    W, S = 4, 1000 * 4  # 1000 fp32
    with fake_process_group(W), FakeTensorMode(), MemTracer() as tr:
        with tr.phase("comm") as st:
            x = torch.empty(1000)
            dist.all_reduce(x)
            dist.broadcast(x, src=1)
            dist.all_gather([torch.empty_like(x) for _ in range(W)], x)
            out = torch.empty(250)
            dist.reduce_scatter_tensor(out, x)
            y = torch.empty(10, dtype=torch.bfloat16).to("meta", torch.float32)  # to the stand-in GPU
    assert st.collectives["all_reduce"] == 2 * (W - 1) * S // W
    assert st.collectives["broadcast"] == S
    assert st.collectives["all_gather"] == (W - 1) * S
    assert st.collectives["reduce_scatter"] == (W - 1) * S // W
    assert st.h2d_bytes == 10 * 2 and y.dtype == torch.float32  # the source's bytes cross


def test_dtensors_own_collectives_are_counted_once():
    """A redistribution all-reduces inside DTensor's dispatch, where the tracing mode is off: it is
    counted at the functional collective's call. A direct functional call is counted once (its op
    also reaches the mode)."""
    import torch.distributed._functional_collectives as funcol
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from torchtitan_clt.tools.fake_world import fake_process_group
    from torchtitan_clt.tools.mem_trace import MemTracer

    W, S = 4, 1000 * 4
    with fake_process_group(W):
        mesh = init_device_mesh("cpu", (W,))  # real tensors: it reads its ranks
        with FakeTensorMode(), MemTracer() as tr, tr.functional_collectives(), tr.phase("redistribute") as st:
            DTensor.from_local(torch.empty(1000), mesh, [Partial()], run_check=False).full_tensor()
        with FakeTensorMode(), MemTracer() as tr, tr.functional_collectives(), tr.phase("direct") as direct:
            funcol.wait_tensor(funcol.all_reduce(torch.empty(1000), "sum", mesh))
    for phase in (st, direct):
        assert phase.collectives["all_reduce"] == 2 * (W - 1) * S // W, dict(phase.collectives)
        assert phase.collective_calls["all_reduce"] == 1, dict(phase.collective_calls)


def _dry_run():
    sys.path.insert(0, str(ROOT / "scripts"))
    import dry_run

    return dry_run


def _tiny(*extra: str):
    from torchtitan_clt.config import load_config

    return load_config(
        [
            "--config", str(ROOT / "train_configs" / "debug_model.toml"),
            "--model.activation=batchtopk", "--model.k=4", "--model.features_per_layer=64",
            "--loss.sparsity=none", "--training.batch_size=64", "--data.buffer_tokens=256",
            "--standardize.estimate_tokens=128", "--checkpoint.export_circuit_tracer=false",
            "--metrics.log_freq=1", *extra,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_trace_of_a_tensor_parallel_run_matches_its_layout():
    """tp=4 on the stand-in GPU: per rank, a quarter of every feature-sharded parameter, AdamW
    state twice that, the ŷ all-reduce's ring bytes per step, and the buffer's rows on the host."""
    dry_run = _dry_run()
    cfg = _tiny("--parallelism.tp=4", "--parallelism.dp_shard=1", "--data.buffer_device=cpu")
    t = dry_run.trace(cfg, 4, gpu="h100-80gb", steps=2)
    assert t["error"] is None, t["error"]
    L, d, F, B = 4, 64, 64, 64  # tiny_llama: 4 layers of d_model 64 (data.layers: all)
    # CLT parameters: W_enc [L, F, d], b_enc [L, F], W_dec.s [F, L-s, d], W_skip [L, d, d] (split
    # over tp on their feature / d_in axis), b_dec [L, d] replicated; JumpReLU-free BatchTopK
    split = L * F * d + L * F + F * d * L * (L + 1) // 2 + L * d * d
    per_rank = (split // 4 + L * d) * 4  # fp32
    step = t["phases"]["step"]["held_at_peak_bytes"]["device"]
    assert step["dictionary parameters"] == per_rank
    ckpt = t["phases"]["checkpoint"]["held_at_peak_bytes"]["device"]
    n_tensors = 4 + L  # W_enc, b_enc, W_dec.0..L-1, W_skip, b_dec
    assert ckpt["optimizer state"] == 2 * per_rank + 4 * n_tensors  # 2 moments + an fp32 step each
    # the features' partial ŷ [B, L, d] fp32, summed over 4 ranks every step
    all_reduce = t["per_step"]["collectives"]["all_reduce"]
    assert all_reduce >= 2 * 3 * (B * L * d * 4) // 4
    # the host buffer: two slots (prefetch) of rows x L x (d_in + d_out) in the LLM's dtype (bf16
    # on a GPU), two pinned staging batches of B rows, the row permutation (int64)
    rows = t["per_step"]["rows_per_refill"]
    assert rows == 2 * 8 * 31  # 256 asked, whole chunks of one rank's 8 contexts x 31 rows
    host = t["phases"]["step"]["held_at_peak_bytes"]["host"]
    assert host["activation buffer"] == 2 * rows * L * 2 * d * 2 + 2 * B * L * 2 * d * 2 + rows * 8
    assert t["fits"] is True


def test_trace_of_the_code_layout_runs_and_moves_y_by_columns():
    """tp=4 on the code layout (issue 27): the step traces through the gather of the code (its pack
    sized from this rank's own count, which the dry run's stand-in gathers do not give); no dense
    ŷ all-reduce, and y's refills after the standardization scattered by columns."""
    dry_run = _dry_run()
    cfg = _tiny(
        "--parallelism.tp=4", "--parallelism.dp_shard=1", "--parallelism.tp_layout=code",
        "--model.activation=topk", "--data.buffer_device=cpu",
    )  # fmt: skip
    # 8 steps: the refills of 496 rows made before the switch (the first, and the one prefetched
    # with it) are drained, so the third is made by columns.
    t = dry_run.trace(cfg, 4, gpu="h100-80gb", steps=8)
    assert t["error"] is None, t["error"]
    L, d, B = 4, 64, 64
    coll = t["per_step"]["collectives"]
    assert coll.get("all_reduce", 0) < (2 * 3 * (B * L * d * 4) // 4) // 10, coll  # no dense ŷ sum
    assert coll["all_gather"] > 0, coll  # the code and the selection
    # The gathered code is sized by its expected entries (k per row over the ranks), not by the
    # padded local layout: no read of its values is left to a neutral answer.
    assert not any("tp_code" in site for site in t["value_reads_assumed"]), t["value_reads_assumed"]
    # Its gradient's reduce-scatter: (tp-1)/tp of tp packs of B*L*k/tp fp32 entries (ring).
    k, tp = 4, 4
    assert coll["reduce_scatter"] == (tp - 1) * (B * L * k // tp) * 4, coll
    # The steady state is the last refill's: x broadcast whole, y scattered as 1/tp of its columns
    # (the refills before the switch broadcast y whole too). A scatter's root sends tp-1 parts and
    # is the root of 1/tp of the chunks: (tp-1)/tp of a part per chunk. Small metadata aside.
    x_bytes, y_bytes = coll["broadcast (data, refill)"], coll["scatter (data, refill)"]
    assert y_bytes > 0 and abs(x_bytes / y_bytes - tp * tp / (tp - 1)) < 0.01, coll
    assert t["per_step"]["h2d_bytes"] > 0
    # The step holds a prefetched refill's transients too (run inline here, beside the step there).
    step = t["phases"]["step"]
    assert step["refill_in_flight_gib"]["device"] > 0, step


@pytest.mark.slow
def test_trace_on_the_cpu_counts_the_buffer_it_allocates():
    dry_run = _dry_run()
    cfg = _tiny("--training.device=cpu", "--parallelism.dp_shard=1", "--data.prefetch=false")
    t = dry_run.trace(cfg, 1, gpu=None, steps=1)
    assert t["error"] is None, t["error"]
    held = t["phases"]["step"]["held_at_peak_bytes"]["host"]
    rows = t["per_step"]["rows_per_refill"]
    L, d = 4, 64
    assert rows == 2 * 8 * 31  # 256 rows asked: whole LLM batches of 8 contexts x 31 rows
    assert held["activation buffer"] == rows * L * 2 * d * 4 + rows * 8  # one fp32 slot, its permutation
    assert t["per_step"]["collective_send_bytes"] == 0
