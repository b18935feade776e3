"""Activations against hand-worked values (forward, STE gradients, selection, thresholds)."""

import math

import pytest
import torch

from torchtitan_clt.models.activations import BatchTopK, JumpReLU, ReLU, TopK, jumprelu, step
from torchtitan_clt.protocols import activation_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs


def _args(L, F, **kw):
    return TranscoderArgs(n_layers=L, features_per_layer=F, **kw)


def test_registry_names():
    for name, cls in [("relu", ReLU), ("jumprelu", JumpReLU), ("topk", TopK), ("batchtopk", BatchTopK)]:
        assert activation_registry.get(name) is cls


def test_relu():
    act = ReLU(_args(1, 3))
    h = torch.tensor([[[-1.0, 0.0, 2.5]]])
    assert torch.equal(act(h), torch.tensor([[[0.0, 0.0, 2.5]]]))
    assert torch.equal(act.feature_thresholds(), torch.zeros(1, 3))


# One layer, two features, three tokens; θ = [0.5, 1.0], ε = 0.2 so the kernel window is |h − θ| < 0.1.
H = torch.tensor([[[0.45, 1.20]], [[0.58, 0.95]], [[0.70, 1.05]]])  # [B=3, L=1, F=2]
G = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])  # upstream gradient dL/da
THETA = [0.5, 1.0]
EPS = 0.2


def test_jumprelu_forward_and_ste_by_hand():
    h = H.clone().requires_grad_(True)
    theta = torch.tensor([THETA]).requires_grad_(True)  # [L, F]
    a = jumprelu(h, theta, EPS)
    # a = h · 1[h > θ]: 0.45 ≤ 0.5 and 0.95 ≤ 1.0 are cut.
    assert torch.allclose(a, torch.tensor([[[0.0, 1.2]], [[0.58, 0.0]], [[0.70, 1.05]]]))
    (a * G).sum().backward()
    # ∂a/∂h = 1[h > θ]
    assert torch.allclose(h.grad, torch.tensor([[[0.0, 2.0]], [[3.0, 0.0]], [[5.0, 6.0]]]))
    # ∂L/∂θ_i = −(θ_i/ε) Σ_b g_bi · 1[|h_bi − θ_i| < ε/2]
    # feature 0: h − θ = −0.05, 0.08, 0.20 -> tokens 0, 1 in window: −(0.5/0.2)(1 + 3) = −10
    # feature 1: h − θ = 0.20, −0.05, 0.05 -> tokens 1, 2 in window: −(1.0/0.2)(4 + 6) = −50
    assert torch.allclose(theta.grad, torch.tensor([[-10.0, -50.0]]))


def test_step_ste_by_hand():
    h = H.clone().requires_grad_(True)
    theta = torch.tensor([THETA]).requires_grad_(True)
    s = step(h, theta, EPS)
    assert torch.equal(s, torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]], [[1.0, 1.0]]]))
    (s * G).sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    # −(1/ε) Σ g K: feature 0: −5 (1 + 3) = −20; feature 1: −5 (4 + 6) = −50
    assert torch.allclose(theta.grad, torch.tensor([[-20.0, -50.0]]))


def test_jumprelu_module_log_threshold_gradient():
    act = JumpReLU(_args(1, 2, jumprelu_threshold_init=0.5, jumprelu_bandwidth=EPS))
    act.init_weights()
    assert torch.allclose(act.feature_thresholds(), torch.full((1, 2), 0.5))
    with torch.no_grad():
        act.log_threshold.copy_(torch.tensor([THETA]).log())
    (act(H) * G).sum().backward()
    # d/d log θ = θ · d/dθ: 0.5 · −10 = −5, 1.0 · −50 = −50
    assert torch.allclose(act.log_threshold.grad, torch.tensor([[-5.0, -50.0]]), atol=1e-5)


def test_jumprelu_rejects_bad_init():
    with pytest.raises(ValueError, match="jumprelu_threshold_init"):
        JumpReLU(_args(1, 2, jumprelu_threshold_init=0.0))


def test_topk_per_token_and_layer():
    act = TopK(_args(2, 4, k=2, threshold_ema_decay=0.5))
    act.init_weights()
    h = torch.tensor([[[0.3, -1.0, 2.0, 0.5], [-1.0, -2.0, -3.0, 0.4]]], requires_grad=True)
    a = act(h)
    # layer 0 keeps 2.0, 0.5; layer 1's top 2 are 0.4 and −1.0 -> ReLU drops −1.0
    assert torch.equal(a, torch.tensor([[[0.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.4]]]))
    a.sum().backward()
    assert torch.equal(h.grad, torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]]))
    # smallest selected positive per layer; first observation is taken as is
    assert torch.allclose(act.threshold, torch.tensor([0.5, 0.4]))
    act.eval()  # eval stays TopK and no longer updates the threshold
    assert torch.equal(act(h.detach()), a.detach())
    assert torch.allclose(act.threshold, torch.tensor([0.5, 0.4]))
    assert not TopK.jumprelu_equivalent


# BatchTopK example: B = 2, L = 2, F = 3, k = 1.
BH = torch.tensor(
    [
        [[0.9, 0.7, 0.3], [-0.5, 0.2, 0.0]],  # token 0: layer 0, layer 1
        [[0.2, 0.1, 0.05], [0.6, -0.1, 0.25]],  # token 1
    ]
)


def test_batchtopk_layer_scope_by_hand():
    act = BatchTopK(_args(2, 3, k=1, batchtopk_scope="layer", threshold_ema_decay=0.5))
    act.init_weights()
    h = BH.clone().requires_grad_(True)
    a = act(h)
    # per layer keep k·B = 2 of the 6 values: layer 0 -> 0.9, 0.7 (both token 0); layer 1 -> 0.6, 0.25
    want = torch.tensor([[[0.9, 0.7, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.6, 0.0, 0.25]]])
    assert torch.equal(a, want)
    g = torch.arange(12.0).view(2, 2, 3) + 1
    (a * g).sum().backward()
    assert torch.equal(h.grad, g * (want > 0))
    assert torch.allclose(act.threshold, torch.tensor([0.7, 0.25]))
    # second batch: per-layer minima 0.5 and 0.45 -> EMA(0.5): 0.6, 0.35
    h2 = torch.tensor([[[0.5, 0.0, 0.0], [0.45, 0.0, 0.0]], [[0.8, 0.0, 0.0], [0.9, 0.0, 0.0]]])
    act(h2)
    assert torch.allclose(act.threshold, torch.tensor([0.6, 0.35]))
    assert torch.equal(act.threshold_updates, torch.tensor([2, 2]))
    # a layer with nothing positive keeps its threshold and count
    act(torch.stack([h2[:, 0], -torch.ones(2, 3)], dim=1))
    assert torch.allclose(act.threshold[1], torch.tensor(0.35))
    assert act.threshold_updates.tolist() == [3, 2]
    # eval: JumpReLU with the per-layer threshold, independent of the batch
    act.eval()
    thr = act.threshold.clone()
    out = act(BH)
    assert torch.equal(out, BH * (BH > thr[None, :, None]))
    assert torch.equal(act.feature_thresholds(), thr[:, None].expand(2, 3))
    assert act.threshold_updates.tolist() == [3, 2]  # eval does not update


def test_batchtopk_all_scope_by_hand():
    act = BatchTopK(_args(2, 3, k=1, batchtopk_scope="all"))
    act.init_weights()
    a = act(BH)
    # keep k·B·L = 4 of 12 jointly: 0.9, 0.7 (layer 0), 0.6 (layer 1), 0.3 (layer 0)
    want = torch.tensor([[[0.9, 0.7, 0.3], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.6, 0.0, 0.0]]])
    assert torch.equal(a, want)
    # one shared threshold: the smallest selected value, 0.3, for every layer
    assert torch.allclose(act.threshold, torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="batchtopk_scope"):
        BatchTopK(_args(2, 3, k=1, batchtopk_scope="token"))
    with pytest.raises(ValueError, match="threshold_ema_decay"):
        BatchTopK(_args(2, 3, k=1, threshold_ema_decay=1.0))
    with pytest.raises(ValueError, match="model.k"):
        TopK(_args(2, 3, k=0))


def test_batchtopk_k_larger_than_batch():
    act = BatchTopK(_args(1, 2, k=5))
    act.init_weights()
    h = torch.tensor([[[1.0, -1.0]], [[0.5, 2.0]]])
    assert torch.equal(act(h), torch.relu(h))
    assert math.isclose(act.threshold.item(), 0.5)


@pytest.mark.parametrize("decay, ok", [(0.0, True), (0.5, True), (0.999, True), (1.0, False), (-0.1, False)])
def test_config_and_activation_agree_on_threshold_ema_decay(decay, ok):
    """The loader's check and the activation's own accept and refuse the same values."""
    from torchtitan_clt.config import ConfigError, load_config

    def config_accepts() -> bool:
        try:
            load_config([f"--model.threshold_ema_decay={decay}"])
        except ConfigError:
            return False
        return True

    def activation_accepts() -> bool:
        try:
            BatchTopK(_args(2, 3, k=1, threshold_ema_decay=decay))
        except ValueError:
            return False
        return True

    assert config_accepts() is ok and activation_accepts() is ok
