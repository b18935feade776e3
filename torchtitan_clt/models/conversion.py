"""TopK / BatchTopK -> JumpReLU: the form circuit-tracer (and any per-token consumer) can load.

``to_jumprelu(model, batches=None, calibrate=True, thresholds="auto", refine_steps=None)`` returns
a new model whose activation is JumpReLU(θ), and a report. θ  # [L, F] comes from:
- ``"native"``: the model's own inference thresholds, unchanged (BatchTopK: its per-layer
  threshold, fitted at the end of a run; the export is then the model the native export loads);
- ``"layer"``: the per-layer threshold tracked during training (EMA of the smallest selected
  pre-activation, ``activation.threshold``; Bussmann et al. 2024, "BatchTopK Sparse Autoencoders");
- ``"feature"`` (needs ``batches``): per feature, the midpoint between the c-th and (c+1)-th largest
  pre-activation on the batches, c the number of tokens the source model fires it on, so each
  feature keeps its firing rate; a feature seen firing fewer than ``min_firings`` (8) times keeps
  its layer's threshold (``feature_thresholds``: a cut fitted on a handful of rows silences a
  rare feature on new text);
- ``"match"`` (needs ``batches``): per feature, the cut of its sorted pre-activations that best
  reproduces the source's selection, each disagreement weighted by h² (``_match_thresholds``);
- ``"auto"``: ``"native"`` for BatchTopK; for TopK ``"match"`` with batches, else ``"layer"``.
With ``calibrate`` and ``batches``, each layer's θ is then scaled by one factor so that the layer's
L0 on the batches equals the source model's (BatchTopK: its training-mode selection over each
batch as given; TopK: k per token). With ``refine_steps`` > 0 (default: 300 for TopK, 0 for
BatchTopK, whose own inference mode is already a threshold), θ and a per-feature affine map of
the pre-activation (encoder row gain, b_enc shift) are then fitted to the reconstruction under an
L0 penalty (``threshold_fit.fit_thresholds``; ``refine_options`` are its keyword arguments) and
calibrated again. A TopK feature fires when it beats the token's other features, not when it
clears a level, so no threshold reproduces it exactly; with ``refit_decoder`` the decoder and
b_dec are then refitted by least squares to the converted codes (``decoder_fit``), which needs
many rows per feature writing a layer (default: on for TopK with >= 8 such rows; a CLT's last
layer is written by n_layers · F features). Measured on SmolLM2-135M, held-out text
(scripts/eval_conversion.py): the SAE preset's FVU gap to its source fell from +27% (``feature``)
to +13% (``match``), +6% (``match`` + fit) and -4.7% (+ decoder refit, 16k calibration rows);
a 6-layer TopK CLT's from +8.5% to +1.7% (fit; 8k rows are too few to refit its decoder:
+41%); L0 within 4%. The report holds L0 and FVU per layer
before (source) and after (JumpReLU) on ``eval_batches`` (default: ``batches``); give held-out
batches to measure generalization.

Batches are raw activations: an iterable of ``(x, y)`` pairs (``x  # [N, L, d_in]``,
``y  # [N, L, d_out]``) or of ``x`` alone (then FVU is measured against the source's output).
Run it on a plain (unsharded) model, e.g. ``checkpoint.export.folded_cpu_copy(model)``; the
pre-activations of the calibration batches are held in memory (a few thousand tokens suffice).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from torchtitan_clt.models.activations import BatchTopK, TopK
from torchtitan_clt.models.decoder_fit import REFIT_FAMILIES
from torchtitan_clt.models.decoder_fit import refit_decoder as fit_decoder
from torchtitan_clt.models.threshold_fit import fit_thresholds
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs

THRESHOLDS = ("auto", "native", "layer", "feature", "match")
# Per-feature thresholds only for features seen firing at least this often in the calibration
# rows; the others keep their layer's threshold (``feature_thresholds``). Measured in issue 30.
MIN_FIRINGS = 8
SIDE_BY_SIDE = ("l0", "fvu", "never_fire")  # conversion.json's native_* / export_* keys


def side_by_side(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]] | None:
    """(native, export) ``{l0, fvu, never_fire}`` of a conversion report; None without them."""
    if f"native_{SIDE_BY_SIDE[0]}" not in report:
        return None
    return tuple({k: report[f"{side}_{k}"] for k in SIDE_BY_SIDE} for side in ("native", "export"))


# Families whose inference model is another family's (same parameters): the conversion's target.
INFERENCE_FAMILY = {"matryoshka_clt": "clt"}
DEFAULT_REFINE_STEPS = 300
REFIT_ROWS_PER_WRITER = 8  # default decoder refit only with >= 8 calibration rows per feature writing a layer


def _batches(batches: Iterable | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    out = []
    for b in batches or []:
        x, y = (b[0], b[1]) if isinstance(b, (tuple, list)) else (b, None)
        out.append((x, y))
    return out


def _decode_raw(model: Transcoder, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return model.unstandardize_out(model.reconstruct_std(acts, model.standardize_in(x)))


@torch.no_grad()
def source_acts(model: Transcoder, h: torch.Tensor) -> torch.Tensor:
    """What the model's activation selects from pre-activations h  # [N, L, F], as trained
    (BatchTopK over the rows of h), without touching the model's tracked threshold."""
    act = copy.deepcopy(model.activation)
    act.train(isinstance(act, BatchTopK))
    return act(h)


@torch.no_grad()
def feature_thresholds(
    h: torch.Tensor, count: torch.Tensor, layer_theta: torch.Tensor | float, min_firings: int = MIN_FIRINGS
) -> torch.Tensor:
    """θ [F] of one layer (the per-layer form a layer-by-layer / sharded fit calls): per feature
    the midpoint between the c-th and (c+1)-th largest of its pre-activations ``h  # [N, F]``,
    c = ``count  # [F]`` its firings in the source model; a feature seen fewer than
    ``min_firings`` times gets ``layer_theta`` (the layer's threshold, scalar or [F]) instead,
    since a cut fitted on a handful of rows (or none: the observed maximum) would silence a rare
    feature on new text. Never below 0."""
    N = h.shape[0]
    srt = h.sort(dim=0, descending=True).values  # [N, F]
    c = count.long()
    above = srt.gather(0, (c - 1).clamp(0, N - 1)[None])[0]  # c-th largest
    below = srt.gather(0, c.clamp(0, N - 1)[None])[0]  # (c+1)-th largest
    theta = torch.where(c >= N, below, 0.5 * (above + below))
    fallback = torch.as_tensor(layer_theta, dtype=theta.dtype, device=theta.device).expand_as(theta)
    theta = torch.where(c < max(int(min_firings), 1), fallback, theta)
    return theta.clamp_min(0.0)


@torch.no_grad()
def _feature_thresholds(
    h: torch.Tensor,
    fired: torch.Tensor,
    layer_theta: torch.Tensor | None = None,
    min_firings: int = MIN_FIRINGS,
) -> torch.Tensor:
    """θ [L, F] from ``feature_thresholds`` per layer of h  # [N, L, F], ``fired  # [L, F]``
    counts; ``layer_theta  # [L]`` the fallback for rarely seen features (None: the old rule,
    θ = the feature's largest pre-activation when it never fired, and no fallback otherwise)."""
    if layer_theta is None:
        layer_theta = h.max(0).values  # [L, F]: the observed maximum
        min_firings = 1
    return torch.stack(
        [feature_thresholds(h[:, j], fired[j], layer_theta[j], min_firings) for j in range(h.shape[1])]
    )


@torch.no_grad()
def _match_thresholds(h: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
    """θ [L, F]: per feature the cut of its sorted pre-activations over the N rows of h
    # [N, L, F] that best reproduces the source's selection ``fired  # [N, L, F]`` bool, each
    disagreement weighted by h² (what it costs the reconstruction, up to the decoder norm):
    argmin_c Σ_{rank ≤ c, not fired} h² + Σ_{rank > c, fired} h². A TopK feature fires on a
    token when it beats the token's other features, not when it clears a level, so its firing
    values overlap its silent ones; this cut drops the small firings that cost little instead of
    matching the count (``_feature_thresholds``). Never below 0."""
    N = h.shape[0]
    srt, idx = h.sort(dim=0, descending=True)  # [N, L, F]
    f = fired.gather(0, idx).to(h.dtype)
    w = srt.clamp_min(0.0).pow(2)
    extra = ((1.0 - f) * w).cumsum(0)  # fire the top c: silent ones that now fire
    missed = (f * w).flip(0).cumsum(0).flip(0)  # fired ones below the cut (rank > c)
    # cost[c] for c = 0..N: nothing fires (c = 0) ... all fire (c = N)
    cost = torch.cat([missed[:1], extra[:-1] + missed[1:], extra[-1:]], dim=0)  # [N+1, L, F]
    c = cost.argmin(0)  # [L, F]
    above = srt.gather(0, (c - 1).clamp(0, N - 1)[None])[0]
    below = srt.gather(0, c.clamp(0, N - 1)[None])[0]
    theta = torch.where(c == 0, srt[0], torch.where(c >= N, below, 0.5 * (above + below)))
    return theta.clamp_min(0.0)


@torch.no_grad()
def _calibrate(h: torch.Tensor, theta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scale each layer's θ by one factor s_l so that Σ_{n,i} 1[h > s_l θ] = target[l] (counts)."""
    out = theta.clone()
    for layer in range(h.shape[1]):
        hl, tl = h[:, layer], theta[layer]  # [N, F], [F]
        pos = tl > 0
        fixed = int((hl[:, ~pos] > 0).sum())  # θ = 0 features: their count does not move with s
        want = int(target[layer]) - fixed
        r = (hl[:, pos] / tl[pos]).flatten()
        if want <= 0 or r.numel() == 0:
            s = float(r.max()) if r.numel() else 1.0
        elif want >= r.numel():
            s = max(float(r.min()), 0.0)
        else:
            top = r.topk(want + 1).values
            s = 0.5 * float(top[-2] + top[-1])
        out[layer] = tl * max(s, 0.0)
    return out


def default_refine_steps(act: torch.nn.Module) -> int:
    """Threshold-fit steps when ``refine_steps`` is None: TopK only (see the module docstring)."""
    return DEFAULT_REFINE_STEPS if isinstance(act, TopK) else 0


def _jumprelu_model(
    src: Transcoder, theta: torch.Tensor, encoder: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Transcoder:
    d = src.args.to_dict()
    d["activation"] = "jumprelu"
    d["family"] = INFERENCE_FAMILY.get(d["family"], d["family"])
    args = TranscoderArgs.from_dict(d)
    device = next(src.parameters()).device
    with torch.device("meta"):
        new = model_registry.get(args.family).build_fn(args)
    new.to_empty(device=device)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("activation.")}
    param = new.activation.log_threshold
    # θ = 0 gives log θ = −inf, whose exp is 0 again: JumpReLU(0) is ReLU, exactly.
    state["activation.log_threshold"] = theta.to(device=device, dtype=torch.float32).log().to(param.dtype)
    if encoder is not None:  # h' = gain · (W x + b) + shift: scale the encoder rows, move b_enc
        gain, shift = (t.to(device) for t in encoder)
        W, b = state["W_enc"], state["b_enc"]
        state["W_enc"] = (W.float() * gain[..., None]).to(W.dtype)
        state["b_enc"] = (b.float() * gain + shift).to(b.dtype)
    new.load_state_dict(state)
    return new.train(src.training)


@torch.no_grad()
def evaluate(
    model: Transcoder, batches: Iterable, reference: Transcoder | None = None, inference: bool = False
) -> dict[str, Any]:
    """L0, FVU and the share of features that never fire, per layer, of ``model`` on raw
    ``batches``, with the activation as trained (see ``source_acts``; ``inference``: as used,
    BatchTopK by its inference threshold, what the native export loads). FVU = Σ‖y − ŷ‖² /
    Σ‖y − ȳ‖² (raw units); y is ``reference``'s output when a batch has no target."""
    sse = tot = sum_y = sumsq = l0 = None
    fires = None  # [L, F] firings per feature
    n = 0
    for x, y in _batches(batches):
        h = model.pre_acts(model.standardize_in(x))
        as_trained = isinstance(model.activation, (TopK, BatchTopK)) and not inference
        a = source_acts(model, h) if as_trained else copy.deepcopy(model.activation).eval()(h)
        fires = (a != 0).sum(0) if fires is None else fires + (a != 0).sum(0)
        y_hat = _decode_raw(model, a, x).double()
        if y is None:
            y = (reference if reference is not None else model).eval()(x)
        y = y.double()
        parts = (
            (y - y_hat).pow(2).sum((0, 2)),
            y.sum(0),
            y.pow(2).sum((0, 2)),
            (a != 0).sum((0, 2)).double(),
        )
        if sse is None:
            sse, sum_y, sumsq, l0 = parts
        else:
            sse, sum_y, sumsq, l0 = (p + q for p, q in zip((sse, sum_y, sumsq, l0), parts))
        n += x.shape[0]
    if n == 0:
        return {}
    tot = sumsq - sum_y.pow(2).sum(-1) / n
    fvu = (sse / tot.clamp_min(1e-30)).tolist()
    l0_layers = (l0 / n).tolist()
    never = (fires == 0).double().mean(-1).tolist()  # [L]
    return {
        "tokens": n,
        "l0_per_layer": l0_layers,
        "fvu_per_layer": fvu,
        "never_fire_per_layer": never,
        "l0": sum(l0_layers) / len(l0_layers),
        "fvu": sum(fvu) / len(fvu),
        "never_fire": sum(never) / len(never),
    }


@torch.no_grad()
def to_jumprelu(
    model: Transcoder,
    batches: Iterable | None = None,
    calibrate: bool = True,
    thresholds: str = "auto",
    eval_batches: Iterable | None = None,
    refine_steps: int | None = None,
    refine_options: dict[str, Any] | None = None,
    refit_decoder: bool | None = None,
    min_firings: int = MIN_FIRINGS,
) -> tuple[Transcoder, dict[str, Any]]:
    """Convert a TopK / BatchTopK model to JumpReLU (see the module docstring). ReLU and JumpReLU
    models come back unchanged. Returns (model, report); the input model is not modified.

    ``refine_steps``: threshold-fit steps (None: ``default_refine_steps``, 300 for TopK, 0 for
    BatchTopK; needs batches); ``refine_options``: ``threshold_fit.fit_thresholds`` arguments.
    ``refit_decoder``: refit W_dec and b_dec to the converted codes on the batches
    (``decoder_fit.refit_decoder``; None: for TopK sources of the plt / sae / clt families when
    the batches hold at least 8 rows per feature writing a layer). ``min_firings``: the
    ``"feature"`` fit's fallback (``feature_thresholds``).

    report: ``converted``, ``calibrated``, ``family`` (``matryoshka_clt`` becomes ``clt``),
    ``source_activation``, ``thresholds``, ``refine_steps`` (and ``refine_history``: the fit's
    minibatch FVU and L0) and, when there are batches to evaluate on,
    ``eval_tokens``, ``l0_before`` / ``l0_after`` / ``fvu_before`` / ``fvu_after`` (per layer)
    and their ``*_mean``; ``native_*`` / ``export_*`` (``side_by_side``): L0, FVU and
    ``never_fire`` (the share of features that never fire on the rows) of the model as used
    (BatchTopK by its inference threshold, what the native export loads) and of the JumpReLU."""
    src: Transcoder = getattr(model, "_orig_mod", model)
    act = src.activation
    report: dict[str, Any] = {"source_activation": src.args.activation, "thresholds": thresholds}
    if not isinstance(act, (TopK, BatchTopK)):
        report.update(converted=False, reason="already ReLU / JumpReLU")
        return src, report
    if thresholds not in THRESHOLDS:
        raise ValueError(f"thresholds must be one of {', '.join(THRESHOLDS)} (got {thresholds!r}).")
    calib = _batches(batches)
    if thresholds == "auto":
        # BatchTopK's inference mode is already a JumpReLU: exporting it keeps one model (issue 30).
        thresholds = "native" if isinstance(act, BatchTopK) else "match" if calib else "layer"
    report["thresholds"] = thresholds
    if thresholds in ("feature", "match") and not calib:
        raise ValueError("per-feature thresholds are estimated from activations: pass batches=[(x, y), ...].")
    if thresholds in ("layer", "native") and not calib and bool((act.threshold_updates == 0).any()):
        raise ValueError(
            "the per-layer threshold was never tracked (it is estimated while training): train some "
            "steps first, or pass batches to calibrate on."
        )
    if isinstance(act, TopK) and not calib and thresholds != "native":
        warnings.warn(
            "TopK -> JumpReLU without batches uses the tracked threshold (the smallest value TopK "
            "selected in a batch), which lets many more features fire; pass batches to calibrate.",
            stacklevel=2,
        )
    encoder = None  # (gain, shift) [L, F] of the fitted encoder: h' = gain · h + shift
    report["refine_steps"] = 0
    theta = act.threshold.float()[:, None].expand(src.args.n_layers, src.args.features_per_layer).clone()
    family = INFERENCE_FAMILY.get(src.args.family, src.args.family)
    if refit_decoder is None:
        # A least-squares decoder needs many more rows than the features writing one layer (a CLT's
        # last layer: n_layers · F), or it fits the calibration rows' noise.
        writers = src.args.features_per_layer * (src.args.n_layers if family == "clt" else 1)
        rows = sum(x.shape[0] for x, _ in calib)
        refit_decoder = (
            isinstance(act, TopK) and family in REFIT_FAMILIES and rows >= REFIT_ROWS_PER_WRITER * writers
        )
    report["refit_decoder"] = bool(refit_decoder and calib) and thresholds != "native"
    ys = None  # raw targets of the calibration rows, for the threshold fit and the decoder refit
    if calib and thresholds != "native":
        xss = [src.standardize_in(x) for x, _ in calib]
        xs_all = torch.cat(xss)
        hs = [src.pre_acts(xs).float() for xs in xss]
        sel = [source_acts(src, h) for h in hs]  # BatchTopK: per batch as given
        fired = torch.cat([a != 0 for a in sel])  # [N, L, F]
        h = torch.cat(hs)  # [N, L, F]
        del hs
        target = fired.sum((0, 2))  # [L] counts
        if thresholds == "feature":
            theta = _feature_thresholds(h, fired.sum(0), act.threshold.float().to(h.device), min_firings)
            report["min_firings"] = int(min_firings)
        elif thresholds == "match":
            theta = _match_thresholds(h, fired)
        del fired
        if calibrate:
            theta = _calibrate(h, theta.to(h.device), target)
        steps = default_refine_steps(act) if refine_steps is None else int(refine_steps)
        if steps > 0 or report["refit_decoder"]:
            # y when the batches have it, else what the source model writes.
            ys = torch.cat(
                [
                    y.float() if y is not None else src.unstandardize_out(src.reconstruct_std(a, xs)).float()
                    for (_, y), a, xs in zip(calib, sel, xss)
                ]
            )
        del sel
        if steps > 0:
            theta, gain, shift, report["refine_history"] = fit_thresholds(
                src,
                h,
                xs_all,
                ys,
                theta.to(h.device),
                target.float() / h.shape[0],
                steps,
                **(refine_options or {}),
            )
            h.mul_(gain).add_(shift)  # now the converted model's pre-activations
            encoder = (gain, shift)
            if calibrate:
                theta = _calibrate(h, theta, target)
        report["refine_steps"] = steps
        del xss
    new = _jumprelu_model(src, theta, encoder)
    if report["refit_decoder"]:
        # The converted codes are its activation of the pre-activations already at hand; the
        # decoder is fitted to what the skip path (if any) leaves.
        target = new.standardize_out(ys).float()
        skip = new.skip_std(xs_all)
        fit_decoder(new, new.activation(h).float(), target if skip is None else target - skip.float())
    if calib and thresholds != "native":
        del h, xs_all
    fitted = bool(calib) and thresholds != "native"
    report.update(converted=True, calibrated=bool(calibrate and fitted), family=new.args.family)
    ev = eval_batches if eval_batches is not None else (calib or None)
    if ev is not None:
        ev = _batches(ev)
        before, after = evaluate(src, ev), evaluate(new.eval(), ev, reference=src)
        native = evaluate(src, ev, inference=True) if isinstance(act, BatchTopK) else before
        new.train(src.training)
        report.update(
            eval_tokens=before.get("tokens", 0),
            l0_before=before.get("l0_per_layer"),
            l0_after=after.get("l0_per_layer"),
            fvu_before=before.get("fvu_per_layer"),
            fvu_after=after.get("fvu_per_layer"),
            l0_before_mean=before.get("l0", math.nan),
            l0_after_mean=after.get("l0", math.nan),
            fvu_before_mean=before.get("fvu", math.nan),
            fvu_after_mean=after.get("fvu", math.nan),
        )
        for k in SIDE_BY_SIDE:  # flat keys: report readers compare floats with a tolerance
            report[f"native_{k}"] = native.get(k, math.nan)
            report[f"export_{k}"] = after.get(k, math.nan)
        report["never_fire_native_per_layer"] = native.get("never_fire_per_layer")
        report["never_fire_export_per_layer"] = after.get("never_fire_per_layer")
    return new, report


@torch.no_grad()
def fit_batchtopk_threshold(model: Transcoder, batches: Iterable) -> dict[str, Any] | None:
    """Fit a BatchTopK model's inference threshold to raw training rows ``batches`` (``(x, y)``
    pairs; ``BatchTopK.calibrate_threshold``: k active per token and layer on them) in place.
    Returns what was fitted (tokens, k, scope, the threshold and the tracked EMA it replaces), or
    None for another activation or no rows."""
    act = getattr(model, "activation", None)
    rows = _batches(batches)
    if not isinstance(act, BatchTopK) or not rows:
        return None
    ema = act.threshold.clone()
    dev = next(model.parameters()).device
    n = sum(x.shape[0] for x, _ in rows)
    thr = act.calibrate_threshold((model.pre_acts(model.standardize_in(x.to(dev))) for x, _ in rows), n)
    return batchtopk_fit_report(act, n, thr, ema)


def batchtopk_fit_report(act: BatchTopK, tokens: int, thr: torch.Tensor, ema: torch.Tensor) -> dict:
    """What a BatchTopK threshold fit logs and writes: its rows, the fitted and the tracked θ."""
    return {
        "tokens": tokens,
        "k": act.k,
        "scope": act.scope,
        "threshold": [round(float(v), 6) for v in thr],
        "tracked_ema": [round(float(v), 6) for v in ema],
    }


def describe_batchtopk_fit(fit: dict[str, Any]) -> str:
    """One line for a ``fit_batchtopk_threshold`` result (the logs of the trainer and scripts)."""
    thr, ema = (sum(fit[k]) / len(fit[k]) for k in ("threshold", "tracked_ema"))
    return (
        f"BatchTopK inference threshold fitted on {fit['tokens']} training tokens (L0 {fit['k']} on "
        f"them): mean {thr:.4g}, was {ema:.4g} (tracked EMA)"
    )
