"""Fit JumpReLU thresholds to a reconstruction objective under an L0 target (``to_jumprelu``'s
``refine_steps``).

Given the pre-activations h  # [N, L, F] of calibration rows, Adam moves log θ  # [L, F], a
per-feature shift of b_enc (``fit_bias``, in units of the layer's median θ) and a per-feature
gain of the encoder row (``fit_gain``: h' = gain · h + shift) to minimize the mean over
layers of the layer's FVU (raw units) plus ``l0_weight`` · Σ_l ((L0_l − target_l) / target_l)²,
L0_l the mean number of features above θ. The decoder is fixed. Gradients reach θ through the
straight-through estimators of Rajamanoharan et al. 2024 ("Jumping Ahead", eqs. 11-12;
``models.activations.jumprelu`` / ``step``) with a rectangle kernel of width ``bandwidth`` · (the
layer's median θ): θ lives in pre-activation units, whose scale differs between models and
layers. The caller re-calibrates L0 exactly afterwards.
"""

from __future__ import annotations

import torch

from torchtitan_clt.models.activations import jumprelu, step
from torchtitan_clt.protocols.transcoder import Transcoder

MAX_STEP_ELEMENTS = 1 << 26  # [rows, L, F] per fit step: 256 MiB per fp32 temporary


def fit_thresholds(
    model: Transcoder,
    h: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    theta: torch.Tensor,
    target_l0: torch.Tensor,
    steps: int = 300,
    lr: float = 0.01,
    bandwidth: float = 0.1,
    l0_weight: float = 1.0,
    batch_size: int = 1024,
    seed: int = 0,
    fit_bias: bool = True,
    fit_gain: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """θ  # [L, F] after ``steps`` Adam steps on minibatches of the N rows, and a short history.

    ``h  # [N, L, F]`` pre-activations, ``xs  # [N, L, d_in]`` standardized inputs (read by a
    MOLT's decoder and the skip path), ``ys  # [N, L, d_out]`` raw targets (FVU in raw units, as reported), ``target_l0  # [L]``
    features per token. θ = 0 features (ReLU) stay at 0; the model's parameters are not trained.
    Returns (θ, gain, shift, history), gain and shift  # [L, F] (1 and 0 when not fitted)."""
    N, L, F = h.shape
    # Rows per step: at most MAX_STEP_ELEMENTS pre-activations, so a wide model's step stays small.
    n_rows = max(1, min(batch_size, N, MAX_STEP_ELEMENTS // (L * F)))
    var = ys.double().var(0, unbiased=False).sum(-1).clamp_min(1e-30).float()  # [L] Σ_d var
    scale = theta.where(theta > 0, torch.nan).nanmedian(dim=1).values.nan_to_num(1.0)  # [L]
    eps = bandwidth * scale
    fixed = theta <= 0
    log_theta = theta.clamp_min(1e-12).log().clone().requires_grad_(True)
    # The b_enc shift in units of the layer's median θ, so that one lr suits both parameters.
    u = torch.zeros_like(theta, requires_grad=fit_bias)
    log_gain = torch.zeros_like(theta, requires_grad=fit_gain)  # scales the encoder row
    opt = torch.optim.Adam([p for p in (log_theta, u, log_gain) if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    with torch.enable_grad():
        try:
            for i in range(steps):
                rows = torch.randint(0, N, (n_rows,), generator=gen).to(h.device)
                hb, yb = h[rows] * log_gain.exp() + u * scale[:, None], ys[rows]
                th = log_theta.exp().masked_fill(fixed, 0.0)
                # One jumprelu call per layer: its bandwidth is a float, and ours is per layer.
                a = torch.stack([jumprelu(hb[:, k], th[k], float(eps[k])) for k in range(L)], dim=1)
                y_hat = model.unstandardize_out(model.reconstruct_std(a, xs[rows]))
                fvu = (yb - y_hat.float()).pow(2).sum(-1).mean(0) / var  # [L]
                l0 = torch.stack([step(hb[:, k], th[k], float(eps[k])).sum(-1).mean() for k in range(L)])
                pen = ((l0 - target_l0) / target_l0.clamp_min(1e-6)).pow(2)
                loss = fvu.mean() + l0_weight * pen.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i == 0 or i == steps - 1 or (i + 1) % max(1, steps // 5) == 0:
                    history.append(
                        {"step": i + 1, "fvu": float(fvu.detach().mean()), "l0": float(l0.detach().mean())}
                    )
        finally:
            for p in params:
                p.requires_grad_(True)
    shift = (u * scale[:, None]).detach()
    return log_theta.detach().exp().masked_fill(fixed, 0.0), log_gain.detach().exp(), shift, history
