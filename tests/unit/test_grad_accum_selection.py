"""``StepSelection``: BatchTopK over micro-batches equals BatchTopK of the concatenated batch.

The reference is ``selection.select`` on the whole ``h`` at once (one forward of the step's
batch); the step is the same ``h`` cut into micro-batches and handed over one at a time. Ids,
ties at the threshold and the smallest kept value must agree exactly, and what is held between
micro-batches stays near the budget (never the step's dense ``h``).
"""

from __future__ import annotations

import pytest
import torch

from torchtitan_clt.kernels.selection import Selection, min_selected, select
from torchtitan_clt.kernels.step_selection import StepSelection


def _split_select(h: torch.Tensor, sel: Selection, parts: int) -> tuple[StepSelection, list[int]]:
    chosen = StepSelection(sel, h.shape[0])
    held = []
    for part in h.chunk(parts):
        chosen.add(part)
        held.append(sum(int((i >= 0).sum()) for i in chosen._ids))
    chosen.finish()
    return chosen, held


def _as_set(idx: torch.Tensor, row0: int = 0) -> set[tuple[int, int, int]]:
    """{(row, layer, feature)} of a selection, rows counted from ``row0``."""
    return {(row0 + n, li, int(idx[n, li, k])) for n, li, k in (idx >= 0).nonzero().tolist()}


def _step_set(chosen: StepSelection, parts: int) -> set[tuple[int, int, int]]:
    out, row0 = set(), 0
    for j in range(parts):
        out |= _as_set(chosen.ids(j), row0)
        row0 += chosen.ids(j).shape[0]
    return out


@pytest.mark.parametrize("scope", ["layer", "all"])
@pytest.mark.parametrize("parts", [1, 3, 4])
def test_micro_batches_select_what_the_whole_batch_selects(scope, parts):
    torch.manual_seed(0)
    n, n_layers, f, k = 48, 3, 40, 5
    h = torch.randn(n, n_layers, f) - 0.3
    h[:, 1] *= 3.0  # layers on different scales: scope "all" then favours layer 1
    sel = Selection("batchtopk", k, scope)
    want, _ = select(h, sel)
    chosen, held = _split_select(h, sel, parts)
    assert _step_set(chosen, parts) == _as_set(want)
    budget = k * n * n_layers  # k·n per layer, or k·n·L over all layers: the same count
    assert len(_as_set(want)) == budget  # no ties here
    for j in range(parts):  # ids ascending per row, padding last: the layout the decoder takes
        ids = chosen.ids(j)
        key = torch.where(ids >= 0, ids, f)
        assert torch.equal(key, key.sort(-1).values)
    torch.testing.assert_close(chosen.min_kept(), min_selected(h, want), rtol=0, atol=0)
    assert max(held) <= 2 * budget  # the budget plus one micro-batch's own picks, at most


def test_ties_at_the_threshold_are_all_kept_and_non_positive_entries_never():
    # Integer values: many entries equal the threshold; a quarter of the batch is all <= 0.
    g = torch.Generator().manual_seed(1)
    h = torch.randint(-2, 4, (32, 2, 16), generator=g).float()
    h[24:] = -1.0
    sel = Selection("batchtopk", 3, "layer")
    want, _ = select(h, sel)
    chosen, _ = _split_select(h, sel, 4)
    assert _step_set(chosen, 4) == _as_set(want)
    assert len(_as_set(want)) > 3 * 32  # ties kept
    assert (chosen.ids(3) < 0).all()  # the non-positive rows keep nothing


def test_fewer_positive_entries_than_the_budget_keeps_them_all():
    h = torch.full((8, 2, 6), -1.0)
    h[0, 0, 2] = h[5, 1, 4] = 0.5
    chosen, _ = _split_select(h, Selection("batchtopk", 4, "all"), 2)
    assert chosen.tau.isneginf().all() or (chosen.tau <= 0).all()
    assert _step_set(chosen, 2) == {(0, 0, 2), (5, 1, 4)}


def test_fixed_ids_pass_through_select():
    h = torch.randn(4, 2, 8)
    ids = torch.tensor([[[1, -1], [0, 3]]] * 4)
    got, tau = select(h, Selection("batchtopk", 1, "layer", fixed=ids))
    assert got is ids and tau.isnan().all()
