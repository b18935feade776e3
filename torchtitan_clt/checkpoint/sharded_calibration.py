"""BatchTopK's end-of-run fits from the sharded model, one source layer at a time.

Both fits read pre-activations of calibration rows, and a layer's are its own encoder's
(``h_j = W_enc,j x_j + b_enc,j``), so they stream like the exports (``sharded_export.LayerStream``):
- the inference threshold (``fit_batchtopk``): per layer the (k·N+1)-th largest of ``h_j``; across
  layers (scope ``all``) the (k·N·L+1)-th, kept as running top candidates over the layers;
- the circuit-tracer JumpReLU conversion (``convert_batchtopk``): ``models.conversion.to_jumprelu``
  with its BatchTopK defaults (per-feature thresholds keeping each feature's firing count,
  calibrated per layer to the source's L0, no refinement), its selection per calibration batch
  taken as the values at or above the batch's cut (a first pass over the layers finds the cut of
  scope ``all``), and its before / after report decoded source by source.
Rank 0's calibration rows are the ones fitted (as on the gathered path); every rank gathers, rank 0
computes, and the result is broadcast. The pre-activations are the family's batched matmul one
layer at a time, so they can differ from the gathered model's in the last bit; the fitted values
then do too (a threshold is one of the pre-activations).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.checkpoint.plain import is_rank0
from torchtitan_clt.checkpoint.sharded_export import LayerStream
from torchtitan_clt.kernels.select_torch import top_values
from torchtitan_clt.models.activations import BatchTopK
from torchtitan_clt.models.conversion import (
    INFERENCE_FAMILY,
    MIN_FIRINGS,
    SIDE_BY_SIDE,
    _calibrate,
    batchtopk_fit_report,
    feature_thresholds,
)


def _rows(calibration: list) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None) for b in calibration]


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def fit_batchtopk(stream: LayerStream, calibration: list) -> dict[str, Any] | None:
    """``models.conversion.fit_batchtopk_threshold`` of the sharded model: its activation's
    ``threshold`` set in place on every rank. None for another activation or no rows."""
    act = stream.model.activation
    rows = [x for x, _ in _rows(calibration)]
    if not isinstance(act, BatchTopK) or not rows:
        return None
    L, n = stream.n_layers, sum(x.shape[0] for x in rows)
    groups = L if act.scope == "layer" else 1
    rank = act.k * n * (L // groups)  # values to keep above the threshold
    thr, top = torch.zeros(groups), None
    for j in range(L):
        W, b = stream.encoder(j)
        if is_rank0():
            flat = torch.cat([stream.pre_acts(x, j, W, b).flatten() for x in rows])
            if top is not None:
                flat = torch.cat([top, flat])
            top = top_values(flat, rank + 1)
            if groups > 1:
                thr[j] = _cut(top, rank)
                top = None
        del W, b  # before the next layer's gather
    if groups == 1 and top is not None:
        thr[0] = _cut(top, rank)
    thr = _from_rank0(thr.clamp_min(0.0).expand(L).contiguous())
    ema = act.threshold.detach().to("cpu").clone()
    act.threshold.copy_(thr.to(act.threshold.device))
    return batchtopk_fit_report(act, n, thr, ema)


def _cut(top: torch.Tensor, rank: int) -> float:
    """``BatchTopK.calibrate_threshold``'s cut of the descending ``top`` values: midway between
    the rank-th and (rank+1)-th largest (0 when there are not more than rank)."""
    if top.numel() <= rank:
        return 0.0
    return float(0.5 * (top[rank - 1] + top[rank])) if rank > 0 else float(top[rank])


def _cuts(stream: LayerStream, rows: list, act: BatchTopK) -> list[torch.Tensor] | None:
    """Scope ``all``: per calibration batch the smallest value its training-mode selection keeps
    over every layer (the k·n·L-th largest; -inf when fewer); None for scope ``layer``."""
    if act.scope == "layer":
        return None
    tops: list[torch.Tensor | None] = [None] * len(rows)
    for j in range(stream.n_layers):
        W, b = stream.encoder(j)
        for i, x in enumerate(rows if is_rank0() else []):
            k_total = act.k * x.shape[0] * stream.n_layers
            flat = stream.pre_acts(x, j, W, b).flatten()
            flat = flat if tops[i] is None else torch.cat([tops[i], flat])
            tops[i] = top_values(flat, k_total)
        del W, b  # before the next layer's gather
    return [
        t[-1]
        if t is not None and t.numel() == act.k * x.shape[0] * stream.n_layers
        else torch.tensor(-math.inf)
        for t, x in zip(tops, rows)
    ]


@torch.no_grad()
def convert_batchtopk(
    stream: LayerStream, calibration: list, thresholds: str = "native", min_firings: int = MIN_FIRINGS
) -> tuple[torch.Tensor, dict[str, Any]]:
    """θ  # [L, F] of the JumpReLU that replaces the sharded BatchTopK model (as the converted
    model's ``feature_thresholds()`` gives it), and ``to_jumprelu``'s report, on every rank.
    ``thresholds``: ``"native"`` (the model's inference threshold, unchanged: ``to_jumprelu``'s
    default for BatchTopK) or ``"feature"`` (``conversion.feature_thresholds`` per layer)."""
    if thresholds not in ("native", "feature"):
        raise ValueError(f"convert_batchtopk: thresholds must be 'native' or 'feature' (got {thresholds!r}).")
    m, act = stream.model, stream.model.activation
    rows = _rows(calibration)
    if any(y is None for _, y in rows):
        raise ValueError("convert_batchtopk needs (x, y) calibration rows (the report's FVU reads y).")
    L, F, d = stream.n_layers, m.args.features_per_layer, m.args.d_out
    N = sum(x.shape[0] for x, _ in rows)
    cuts = _cuts(stream, [x for x, _ in rows], act)
    theta = torch.zeros(L, F)
    # before (training selection), after (the export) and, when they differ, native (inference)
    V = 2 if thresholds == "native" else 3
    l0 = torch.zeros(V, L, dtype=torch.float64)
    never = torch.zeros(V, L, dtype=torch.float64)  # share of features that never fire
    y_hat = torch.zeros(V, N, L, d) if is_rank0() else None  # standardized
    skip_sse = torch.zeros(2, L, dtype=torch.float64)  # raw SSE of the export with / without W_skip
    for j in range(L):
        w = stream.raw_layer(j)
        if not is_rank0():
            del w
            continue
        hs = [stream.pre_acts(x, j, w["W_enc"], w["b_enc"]) for x, _ in rows]
        fired = []
        for i, h in enumerate(hs):
            if cuts is None:
                k_total = act.k * h.shape[0]
                top = top_values(h.flatten(), k_total)
                cut = top[-1] if top.numel() == k_total else torch.tensor(-math.inf)
            else:
                cut = cuts[i]
            fired.append((h >= cut) & (h > 0))
        h, fired = torch.cat(hs), torch.cat(fired)  # [N, F]
        del hs
        native_th = act.threshold[j].float().to(h.device)
        if thresholds == "native":
            th = native_th.expand(F)
        else:
            th = feature_thresholds(h, fired.sum(0), native_th, min_firings)
            th = _calibrate(h[:, None], th[None], fired.sum()[None])[0]
        theta[j] = th.float().log().exp()  # the converted JumpReLU stores log θ
        after = h * (h > theta[j]).to(h.dtype)
        before = h * fired.to(h.dtype)
        variants = (before, after) if V == 2 else (before, after, h * (h > native_th).to(h.dtype))
        for k, a in enumerate(variants):
            l0[k, j] = float((a != 0).sum()) / N
            never[k, j] = float(((a != 0).sum(0) == 0).double().mean())
        W_dec = w[stream.plan.per_source[j]] if stream.plan.per_source else w["W_dec"][:, None]  # [F, T, d]
        skip = None
        if "W_skip" in w:
            xs = (torch.cat([x[:, j] for x, _ in rows]).float() - stream.std["in_mean"][j]) / stream.std[
                "in_scale"
            ][j]
            skip = xs @ w["W_skip"]  # [N, d] standardized
        for k, a in enumerate(variants):
            y_hat[k, :, j : j + W_dec.shape[1]] += (a @ W_dec.reshape(F, -1)).view(N, -1, d)
            y_hat[k, :, j] += w["b_dec"]
            if skip is not None:
                y_hat[k, :, j] += skip
        if skip is not None:  # target j is complete (sources <= j): what a stock load_clt loses on it
            sc, mu = stream.std["out_scale"][j].double(), stream.std["out_mean"][j].double()
            full = y_hat[1, :, j].double() * sc + mu
            yj = torch.cat([y[:, j] for _, y in rows]).double()
            skip_sse[0, j] = (yj - full).pow(2).sum()
            skip_sse[1, j] = (yj - (full - skip.double() * sc)).pow(2).sum()
            del full, yj, skip
        del w, h, fired, before, after, a, W_dec, variants  # before the next layer's gather
    theta = _from_rank0(theta)
    report: dict[str, Any] = {
        "source_activation": m.args.activation,
        "thresholds": thresholds,
        "refine_steps": 0,
        "refit_decoder": False,
        **({} if thresholds == "native" else {"min_firings": int(min_firings)}),
        "converted": True,
        "calibrated": thresholds != "native",
        "family": INFERENCE_FAMILY.get(m.args.family, m.args.family),
    }
    if is_rank0():
        y = torch.cat([y for _, y in rows]).double()
        std = stream.std
        raw = y_hat.double() * std["out_scale"].double() + std["out_mean"].double()  # [2, N, L, d]
        tot = y.pow(2).sum((0, 2)) - y.sum(0).pow(2).sum(-1) / N
        fvu = ((y[None] - raw).pow(2).sum((1, 3)) / tot.clamp_min(1e-30)).tolist()
        l0s = l0.tolist()
        report.update(
            eval_tokens=N,
            l0_before=l0s[0],
            l0_after=l0s[1],
            fvu_before=fvu[0],
            fvu_after=fvu[1],
            l0_before_mean=sum(l0s[0]) / L,
            l0_after_mean=sum(l0s[1]) / L,
            fvu_before_mean=sum(fvu[0]) / L,
            fvu_after_mean=sum(fvu[1]) / L,
        )
        nat = V - 1 if V == 3 else 1  # the native model's row (the export's when they are one)
        nv = never.tolist()
        per = {"l0": l0s, "fvu": fvu, "never_fire": nv}
        for key in SIDE_BY_SIDE:  # in to_jumprelu's order
            for side, k in (("native", nat), ("export", 1)):
                report[f"{side}_{key}"] = sum(per[key][k]) / L
        if m.args.skip_connection:
            t = tot.clamp_min(1e-30)
            report["_stock_fvu"] = ((skip_sse[0] / t).tolist(), (skip_sse[1] / t).tolist())
        report["never_fire_native_per_layer"] = nv[nat]
        report["never_fire_export_per_layer"] = nv[1]
    return theta, report
