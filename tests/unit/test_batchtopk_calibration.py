"""BatchTopK's inference threshold fitted to training rows (``BatchTopK.calibrate_threshold``):
on pre-activations whose quantiles are known it lands on the quantile that keeps k per token and
layer, the eval-mode forward then fires exactly k on those rows and about k on fresh ones, and
fitting in batches equals fitting on all rows at once."""

from __future__ import annotations

import pytest
import torch

from torchtitan_clt.models.activations import BatchTopK
from torchtitan_clt.protocols.transcoder import TranscoderArgs

K, F = 5, 100  # k / F = 5%: the threshold is the 95th percentile of the pre-activations


def _act(scope: str, n_layers: int = 2) -> BatchTopK:
    act = BatchTopK(TranscoderArgs(n_layers=n_layers, features_per_layer=F, k=K, batchtopk_scope=scope))
    act.threshold.fill_(-1.0)  # a tracked value the fit must replace
    return act.eval()


def _uniform(n: int, scales: list[float], seed: int) -> torch.Tensor:
    """[n, L, F] with layer l uniform on (−scales[l], scales[l])."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, len(scales), F, generator=g, dtype=torch.float64) * 2 - 1
    return (u * torch.tensor(scales, dtype=torch.float64)[:, None]).float()


def _l0(act: BatchTopK, h: torch.Tensor) -> torch.Tensor:
    """[L] active features per token under the eval-mode forward."""
    return (act(h) != 0).float().sum(-1).mean(0)


def test_layer_scope_hits_the_known_quantile_and_k():
    act = _act("layer")
    h = _uniform(4000, [1.0, 1.0], seed=0)
    thr = act.calibrate_threshold(list(h.split(1000)), n_rows=4000)
    # P(U(−1, 1) > t) = (1 − t) / 2 = k / F  ⇒  t = 0.9
    torch.testing.assert_close(thr, torch.full((2,), 0.9), atol=5e-3, rtol=0)
    assert torch.equal(act.threshold, thr)
    assert torch.equal(_l0(act, h), torch.full((2,), float(K)))  # exactly k on its own rows
    fresh = _l0(act, _uniform(4000, [1.0, 1.0], seed=1))
    assert ((fresh - K).abs() <= 0.02 * K).all(), fresh


def test_all_scope_shares_one_threshold_across_layers():
    act = _act("all")
    h = _uniform(4000, [1.0, 2.0], seed=2)
    thr = act.calibrate_threshold(h.split(512), n_rows=4000)
    # over both layers (1 − t)/2·[t < 1] + (2 − t)/4 = 2·k/F; at t > 1 only layer 1 counts: t = 1.6
    torch.testing.assert_close(thr, torch.full((2,), 1.6), atol=1e-2, rtol=0)
    assert _l0(act, h).sum() == 2 * K  # k per token and layer on average, over the layers
    assert _l0(act, h)[0] == 0  # layer 0 never reaches 1.6


def test_batches_equal_one_batch_when_one_batch_holds_the_largest_values():
    h = _uniform(600, [1.0, 1.0], seed=3)
    h[:100] += 5.0  # the first batch holds every value above the quantile
    one, split = _act("layer"), _act("layer")
    one.calibrate_threshold([h], n_rows=600)
    split.calibrate_threshold(h.split(100), n_rows=600)
    assert torch.equal(one.threshold, split.threshold)
    assert torch.equal(_l0(split, h), torch.full((2,), float(K)))


def test_too_few_positive_values_give_threshold_zero_and_a_wrong_row_count_is_refused():
    act = _act("layer")
    h = -torch.rand(10, 2, F)  # nothing positive
    assert torch.equal(act.calibrate_threshold([h], n_rows=10), torch.zeros(2))
    with pytest.raises(ValueError, match="expected 11"):
        act.calibrate_threshold([h], n_rows=11)


def test_top_values_matches_topk_with_a_bounded_workspace(monkeypatch):
    """The calibrations' running top (``select_torch.top_values``): the values of one ``topk`` over
    the whole input, while no single ``topk`` call sees more than a chunk plus the k kept."""
    from torchtitan_clt.kernels import select_torch

    widths = []
    real = torch.Tensor.topk

    def spy(self, k, *a, **kw):
        widths.append(self.shape[-1])
        return real(self, k, *a, **kw)

    g = torch.Generator().manual_seed(0)
    for shape, k, chunk in [((5000,), 300, 1000), ((3, 4000), 50, 900), ((2, 10), 30, 4)]:
        t = torch.randn(shape, generator=g).round(decimals=1)  # ties too
        want = t.topk(min(k, shape[-1]), dim=-1).values
        widths.clear()
        monkeypatch.setattr(torch.Tensor, "topk", spy)
        got = select_torch.top_values(t, k, chunk)
        monkeypatch.setattr(torch.Tensor, "topk", real)
        assert torch.equal(got, want), shape
        rows = t.numel() // shape[-1]
        assert len(widths) > 1 and max(widths) <= k + max(chunk // rows, 1), (shape, widths)
