"""Tensor-parallel group: each rank extracts its own contexts; the group sees identical batches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _cfg():
    from torchtitan_clt.config import JobConfig

    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), str(ASSETS / "tiny_text.txt")
    d.seq_len, d.llm_batch_size, d.layers, d.buffer_tokens = 8, 2, [1], 20
    return cfg


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=2)
    try:
        from torchtitan_clt.data import SourceContext, build_stream_source

        src = build_stream_source(_cfg(), SourceContext(tp_group=dist.group.WORLD, seed=1))
        batches = [src.next_batch(16) for _ in range(3)]
        torch.save(batches, os.path.join(folder, f"rank{rank}.pt"))
        # Refills of 28 rows (2 readers × 14): 48 rows served = 20 into the second refill.
        torch.save((src.state_dict(), src.next_batch(8)), os.path.join(folder, f"state{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp_group_gets_identical_batches_from_shared_extraction(tmp_path):
    from torchtitan_clt.data import ActivationExtractor, SourceContext, load_llm
    from torchtitan_clt.data.text import TextSpec
    from torchtitan_clt.data.tokenize import build_token_loader

    # What each of the two readers (the text sharded over the TP ranks) extracts on its own.
    # Done first, so the forked workers inherit every imported module.
    cfg = _cfg()
    llm, tok = load_llm(cfg.data.model_path)
    ext = ActivationExtractor(llm, "resid_mid", "mlp_out", [1])
    per_reader = []
    for reader in range(2):
        loader = build_token_loader(TextSpec(cfg.data.dataset), tok, 8, 2, dp_rank=reader, dp_degree=2)
        per_reader.append(torch.cat([ext(b)[0] for _, b in zip(range(2), loader)]).flatten(1))

    run_ranks(_worker, (str(tmp_path),), 2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for (x0, y0), (x1, y1) in zip(r0, r1):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)

    served = torch.cat([x for x, _ in r0]).flatten(1)
    for rows in per_reader:  # both readers contributed rows
        assert ((served[:, None] - rows[None]).abs().amax(-1) < 1e-5).any(0).sum() > 0
    allrows = torch.cat(per_reader)  # and every served row is one of theirs
    assert ((served[:, None] - allrows[None]).abs().amax(-1) < 1e-5).any(1).all()

    # Resume the TP group's states on one rank without TP: it replays both readers' batches itself
    # and serves the 8 rows the group had left.
    from torchtitan_clt.data import build_stream_source as build

    (sd0, (owed, _)), (sd1, _) = (torch.load(tmp_path / f"state{r}.pt", weights_only=False) for r in range(2))
    one = build(cfg, SourceContext(seed=1))
    one.load_state_dict_from_ranks([sd1, sd0])  # any order: the states say which reader they are
    got, _ = one.next_batch(8)
    assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(map(tuple, owed.flatten(1).tolist()))
    one.close()


def _columns_worker(rank: int, folder: str, switch_after: int) -> None:
    """5 batches of 16 rows; after ``switch_after`` of them y comes as this rank's columns
    (``deliver_target_columns``, the code layout). Counts the scatters that moved y."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv{switch_after}", rank=rank, world_size=2)
    scatters = []
    real = dist.scatter

    def spy(tensor, *a, **k):
        scatters.append(tensor.numel())
        return real(tensor, *a, **k)

    dist.scatter = spy
    try:
        from torchtitan_clt.data import SourceContext, build_stream_source

        src = build_stream_source(_cfg(), SourceContext(tp_group=dist.group.WORLD, seed=1))
        alone = [dist.new_group([r]) for r in range(2)]  # (every rank makes every group)
        batches = []
        for i in range(5):
            if i == switch_after:
                try:  # a model's tp group that is not the data's: refused, nothing switched
                    src.deliver_target_columns(alone[rank])
                    raise AssertionError("a tp group other than the data's was accepted")
                except RuntimeError as e:
                    assert "is not the model's" in str(e)
                assert src.deliver_target_columns(dist.group.WORLD)
            batches.append(src.next_batch(16))
        src.close()
        torch.save((batches, len(scatters)), os.path.join(folder, f"cols{switch_after}_rank{rank}.pt"))
    finally:
        dist.scatter = real
        dist.destroy_process_group()


@pytest.mark.slow
def test_code_layout_moves_only_each_ranks_columns_of_y(tmp_path):
    """The same rows as whole refills; after the switch each rank's y is its half of the columns
    (mid-refill, a prefetched whole refill, then refills scattered by columns)."""
    for switch in (5, 1):  # 5: never switched, the reference
        run_ranks(_columns_worker, (str(tmp_path), switch), 2, start_method="fork")
    ref = [torch.load(tmp_path / f"cols5_rank{r}.pt")[0] for r in range(2)]
    assert all(torch.load(tmp_path / f"cols5_rank{r}.pt")[1] == 0 for r in range(2))  # whole: broadcasts only
    assert all(torch.equal(a[1], b[1]) for a, b in zip(*ref))  # whole y: the same on both ranks
    for r in range(2):
        got, n_scatter = torch.load(tmp_path / f"cols1_rank{r}.pt")
        assert n_scatter > 0  # y of the later refills moved by columns, not broadcast whole
        for i, ((x, y), (x_ref, y_ref)) in enumerate(zip(got, ref[r])):
            assert torch.equal(x, x_ref)
            w = y_ref.shape[-1] // 2
            want = y_ref if i < 1 else y_ref[..., r * w : (r + 1) * w]
            assert torch.equal(y, want), (r, i)
