"""Activation functions: ``ReLU``, ``JumpReLU``, ``TopK``, ``BatchTopK``.

Each is built as ``cls(args: TranscoderArgs)`` and maps pre-activations ``h  # [B, L, F]`` to
activations of the same shape. Every one also offers, for export and for losses:
- ``init_weights()``: reset its parameters / buffers (after ``to_empty``);
- ``feature_thresholds()``: θ  # [L, F] in pre-activation units (0 for ReLU);
- ``jumprelu_equivalent``: whether, in eval mode, it *is* JumpReLU(θ = feature_thresholds()),
  so a circuit-tracer export reproduces it exactly (TopK's threshold is only an approximation);
- ``selection()``: the ``kernels.selection.Selection`` it makes now (TopK, BatchTopK in training),
  or None for an elementwise function: the families' sparse step selects with it;
- ``grad_support(h)``: where ∂L/∂a is needed although a = 0 (JumpReLU's threshold window), or None;
- ``mesh_groups``: set by ``distributed.parallelize`` (selection over ranks).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from torchtitan_clt.kernels import dispatch
from torchtitan_clt.kernels.select_torch import top_values
from torchtitan_clt.kernels.selection import Selection, min_selected, select
from torchtitan_clt.kernels.step_selection import StepSelection
from torchtitan_clt.models.common import new_param
from torchtitan_clt.models.init import Constant, init_param_
from torchtitan_clt.protocols.registry import activation_registry
from torchtitan_clt.protocols.transcoder import MeshGroups, TranscoderArgs, parse_dtype


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[|u| < 1/2] (unit width, unit area)."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """a = h · H(h − θ), with the straight-through estimator of Rajamanoharan et al. 2024
    ("Jumping Ahead", eq. 11):  ∂a/∂h = H(h − θ),  ∂a/∂θ = −(θ/ε) · K((h − θ)/ε)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_h = g * (h > theta).to(g.dtype)
        hf, tf = h.float(), theta.float()
        grad_theta = -(tf / eps) * rectangle((hf - tf) / eps) * g.float()
        return grad_h, grad_theta.sum_to_size(theta.shape).to(theta.dtype), None


class _StepFn(torch.autograd.Function):
    """H(h − θ) for an L0 penalty: ∂/∂h = 0, ∂/∂θ = −(1/ε) · K((h − θ)/ε) (same paper, eq. 12)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, theta = ctx.saved_tensors
        eps = ctx.eps
        hf, tf = h.float(), theta.float()
        grad_theta = -(1.0 / eps) * rectangle((hf - tf) / eps) * g.float()
        return torch.zeros_like(h), grad_theta.sum_to_size(theta.shape).to(theta.dtype), None


def jumprelu(h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLUFn.apply(h, theta, bandwidth)


def step(h: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _StepFn.apply(h, theta, bandwidth)


class Activation(nn.Module):
    """Defaults shared by the activations: elementwise, no extra gradient support, one process."""

    jumprelu_equivalent = True
    mesh_groups = MeshGroups()

    def selection(self) -> Selection | None:
        return None

    def grad_support(self, h: torch.Tensor) -> torch.Tensor | None:
        return None


class ReLU(Activation):
    def __init__(self, args: TranscoderArgs):
        super().__init__()
        self.n_layers, self.n_features = args.n_layers, args.features_per_layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h)

    def init_weights(self) -> None:
        pass

    def feature_thresholds(self) -> torch.Tensor:
        return torch.zeros(self.n_layers, self.n_features)


class JumpReLU(Activation):
    """a = h · 1[h > θ], θ = exp(log_threshold)  # [L, F], trained through the STE above."""

    def __init__(self, args: TranscoderArgs):
        super().__init__()
        if args.jumprelu_threshold_init <= 0 or args.jumprelu_bandwidth <= 0:
            raise ValueError(
                "model.jumprelu_threshold_init and model.jumprelu_bandwidth must be > 0 "
                f"(got {args.jumprelu_threshold_init}, {args.jumprelu_bandwidth})."
            )
        self.threshold_init = args.jumprelu_threshold_init
        self.bandwidth = args.jumprelu_bandwidth
        self.log_threshold = new_param(args.n_layers, args.features_per_layer, dtype=parse_dtype(args.dtype))

    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return jumprelu(h, self.threshold(), self.bandwidth)

    def grad_support(self, h: torch.Tensor) -> torch.Tensor | None:
        """``[B, L, F]`` bool: the STE's threshold gradient reads ∂L/∂a also where a = 0 but
        |h − θ| < ε/2, so a sparse decoder must carry those entries (with value 0)."""
        if not torch.is_grad_enabled():
            return None
        return (h.detach() - self.threshold().detach()).abs() < self.bandwidth / 2

    def init_weights(self) -> None:
        # this rank's shard only (models/init.py)
        init_param_(self.log_threshold, Constant(self.log_threshold.shape, math.log(self.threshold_init)))

    def feature_thresholds(self) -> torch.Tensor:
        return self.threshold().detach()


class _ThresholdTracker(Activation):
    """EMA of the smallest selected positive activation per layer: ``threshold  # [L]``.

    A layer's first observation sets it; ``threshold_updates  # [L]`` counts observations.
    Observations are minima over every rank's batch (``mesh_groups.batch``), so every rank tracks
    the same threshold.
    """

    def __init__(self, args: TranscoderArgs):
        super().__init__()
        self.k = args.k
        self.decay = args.threshold_ema_decay
        self.n_layers, self.n_features = args.n_layers, args.features_per_layer
        if self.k < 1:
            raise ValueError(f"model.k must be >= 1 for {args.activation} (got {self.k}).")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"model.threshold_ema_decay must be in [0, 1) (got {self.decay}).")
        self.register_buffer("threshold", torch.zeros(args.n_layers, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros(args.n_layers, dtype=torch.int64))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.threshold.zero_()
            self.threshold_updates.zero_()

    @torch.no_grad()
    def _observe(self, min_pos: torch.Tensor) -> None:
        """min_pos  # [L]: smallest selected positive value per layer (inf: none this batch)."""
        obs = min_pos.float().to(self.threshold.device)
        seen = torch.isfinite(obs)
        first = self.threshold_updates == 0
        ema = self.decay * self.threshold + (1.0 - self.decay) * obs
        new = torch.where(first, obs, ema)
        self.threshold.copy_(torch.where(seen, new, self.threshold))
        self.threshold_updates.add_(seen.to(self.threshold_updates.dtype))

    def feature_thresholds(self) -> torch.Tensor:
        return self.threshold[:, None].expand(self.n_layers, self.n_features).clone()


def _to_dense(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[B, L, F]`` relu'd values of ``h`` at ``idx``, zeros elsewhere; gradients reach the kept
    pre-activations only."""
    vals = torch.relu(dispatch.gather_selected(h, idx))
    return torch.zeros_like(h).scatter_add(-1, idx.clamp(min=0), vals)


class _Selecting(_ThresholdTracker):
    """TopK and BatchTopK: ``kernels.selection.select`` over the ranks of ``mesh_groups``."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self.mesh_groups
        sel = self.selection()
        group = g.features if sel.kind == "topk" else g.batch
        idx, _ = select(h, sel, group=group, batch_scale=g.batch_scale)
        if self.training:
            self._observe(self.observed_min(h, idx))
        return _to_dense(h, idx)

    def observed_min(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[L]`` what ``_observe`` takes from a selection: the smallest kept value over all
        ranks, per layer (one value for all layers under BatchTopK scope ``all``). None seen
        (+inf) while the ids are fixed: the step observes its whole selection once instead."""
        if getattr(self, "_fixed", None) is not None:
            return torch.full((h.shape[1],), float("inf"), device=h.device)
        m = min_selected(h, idx, self.mesh_groups.batch)
        return m.amin().expand(len(m)) if getattr(self, "scope", "layer") == "all" else m


class TopK(_Selecting):
    """Per token and layer keep the k largest positive pre-activations. Eval mode stays TopK; the
    tracked threshold only serves a JumpReLU conversion (circuit-tracer export)."""

    jumprelu_equivalent = False

    def selection(self) -> Selection:
        return Selection("topk", self.k)


class BatchTopK(_Selecting):
    """Keep the k·B largest positive pre-activations of each layer over the batch (scope
    ``layer``) or the k·B·L largest across all layers (scope ``all``; one shared threshold), B the
    global batch. Gradients reach the selected pre-activations only. In eval mode it is JumpReLU
    with the tracked threshold, so a token's features do not depend on the rest of its batch."""

    def __init__(self, args: TranscoderArgs):
        super().__init__(args)
        if args.batchtopk_scope not in ("layer", "all"):
            raise ValueError(
                f"model.batchtopk_scope must be 'layer' or 'all' (got {args.batchtopk_scope!r})."
            )
        self.scope = args.batchtopk_scope
        self._collect: StepSelection | None = None
        self._fixed: torch.Tensor | None = None

    def selection(self) -> Selection | None:
        return Selection("batchtopk", self.k, self.scope, fixed=self._fixed) if self.training else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            thr = self.threshold.to(h.dtype)[:, None]  # [L, 1]
            return h * (h > thr).to(h.dtype)
        if self._collect is not None:  # first pass of an accumulated step: candidates only
            self._collect.add(h)
            return h[..., :0]  # nothing to decode; the caller discards it
        return super().forward(h)

    # Gradient accumulation (trainer/step.py): the step's selection over all its micro-batches.
    @contextlib.contextmanager
    def collecting(self, into: StepSelection) -> Iterator[None]:
        """Within the block the training forward (``model.encode`` under no_grad) only hands its
        pre-activations to ``into`` (``StepSelection.add``) and returns an empty tensor."""
        self._collect = into
        try:
            yield
        finally:
            self._collect = None

    @contextlib.contextmanager
    def fixed_ids(self, idx: torch.Tensor) -> Iterator[None]:
        """Within the block the training forward keeps ``idx [N, L, K]`` (``StepSelection.ids``)
        instead of selecting, and observes nothing (``observe_step`` observes the step once)."""
        self._fixed = idx
        try:
            yield
        finally:
            self._fixed = None

    def observe_step(self, chosen: StepSelection) -> None:
        """The threshold EMA's one observation of an accumulated step: its smallest kept value,
        as one forward over the whole batch would observe."""
        m = chosen.min_kept()
        self._observe(m.amin().expand(len(m)) if self.scope == "all" else m)

    @torch.no_grad()
    def calibrate_threshold(self, pre_acts: Iterable[torch.Tensor], n_rows: int) -> torch.Tensor:
        """Set the eval-mode threshold so that on ``n_rows`` rows (their ``[n, L, F]``
        pre-activations, in batches) exactly k features fire per token and layer on average (ties
        aside): per layer midway between the (k·N)-th and (k·N+1)-th largest value (scope ``all``:
        over every layer), never below 0; midway, so that whether a row's value fires does not
        depend on the rounding of another computation of it (a sharded one, an export). The tracked EMA of the smallest selected value sits below that
        quantile, so its eval L0 is above k. Returns the new ``threshold  # [L]``."""
        groups = self.n_layers if self.scope == "layer" else 1
        rank = self.k * n_rows * (self.n_layers // groups)  # values to keep above the threshold
        top, seen = None, 0  # the rank+1 largest values so far, per group
        for h in pre_acts:
            seen += h.shape[0]
            flat = h.float().transpose(0, 1).reshape(groups, -1)
            if top is not None:
                flat = torch.cat([top.to(flat.device), flat], dim=1)
            top = top_values(flat, rank + 1)
        if top is None or seen != n_rows:
            raise ValueError(f"calibrate_threshold: got {seen} rows of pre-activations, expected {n_rows}")
        thr = top[:, rank] if top.shape[1] > rank else torch.zeros(groups, device=top.device)
        if 0 < rank < top.shape[1]:  # midway to the rank-th: no row sits on the cut (issue 30)
            thr = 0.5 * (top[:, rank - 1] + top[:, rank])
        self.threshold.copy_(thr.clamp_min(0.0).expand(self.n_layers).to(self.threshold.device))
        return self.threshold.clone()


activation_registry.register("relu", ReLU)
activation_registry.register("jumprelu", JumpReLU)
activation_registry.register("topk", TopK)
activation_registry.register("batchtopk", BatchTopK)
