"""The run report: ``<run>/report/eval.json`` and PNG plots (matplotlib, Agg, no pyplot state).

``write_report(run_folder, eval_results, feature_stats)`` reads ``<run>/metrics.jsonl`` (training
lines: ``step``, ``loss``, ``loss_<term>``, ``fvu``, ``l0``, ``fvu_per_layer``, ``l0_per_layer``;
evaluation lines: ``eval_*`` from ``Evaluator.log_metrics``) and writes, each when its data exist:

    loss_fvu.png                 loss (and its terms) and FVU (mean and per layer) against step
    l0_per_layer.png             L0 per layer: held-out evaluation and last training log
    density_histogram.png        log10 feature firing frequency per layer, dead features counted
    fvu_vs_l0.png                FVU against L0 over the logged steps and evaluations
    ce_recovered_per_layer.png   open-loop CE recovered per layer (zero / mean ablation), closed loop
    decoder_norm_by_offset.png   CLTs: share of each source's decoder norm by target offset

``eval.json`` holds ``headline`` (the numbers to quote), ``replacement`` (``evaluate_replacement``),
``feature_stats``, ``training`` (the last training line) and ``evaluations`` (every logged or
given evaluation record, by step); NaN is written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPORT_DIR = "report"


def read_metrics(run_folder: str | Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` (lines cut short by a crash are skipped)."""
    path = Path(run_folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _json_safe(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else float("nan")


def headline(eval_results: dict | None, feature_stats: dict | None) -> dict[str, Any]:
    """The few numbers a note quotes."""
    h: dict[str, Any] = {}
    if eval_results:
        c = eval_results["closed_loop"]
        h.update(
            ce_clean=eval_results["ce_clean"],
            ce_replacement=c["ce"],
            delta_ce=c["delta_ce"],
            ce_recovered_zero=c["ce_recovered_zero"],
            ce_recovered_mean=c["ce_recovered_mean"],
            kl=c["kl"],
            top1_agreement=c["top1_agreement"],
            ce_zero_ablation=eval_results["zero_ablation"]["ce"],
            ce_mean_ablation=eval_results["mean_ablation"]["ce"],
            tokens_scored=eval_results["tokens_scored"],
        )
    if feature_stats:
        for k in ("fvu", "explained_variance", "l0", "dead_frac", "dense_frac"):
            h[k] = feature_stats[k]
    return h


def write_report(
    run_folder: str | Path | None,
    eval_results: dict | None = None,
    feature_stats: dict | None = None,
    out_dir: str | Path | None = None,
    history: list[dict[str, Any]] | None = None,
    reference: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write ``<run_folder>/report/eval.json`` and the plots; returns {name: path} of what was
    written. ``out_dir`` writes there instead; ``run_folder`` None: no training curves.
    ``history``: more evaluation records (``step`` + ``Evaluator.log_metrics``), e.g. one per
    checkpoint; they replace the logged evaluation of the same step. ``reference``: points
    ``{"label", "l0", "fvu"}`` drawn beside the run on the FVU–L0 plot (default: the quality
    benchmark's rows, ``quality_reference()``)."""
    if out_dir is None and run_folder is None:
        raise ValueError("write_report: give run_folder, out_dir or both.")
    folder = Path(out_dir) if out_dir is not None else Path(run_folder) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_folder) if run_folder is not None else []
    train = [r for r in records if "loss" in r]
    by_step = {r["step"]: r for r in records if "eval_kl" in r or "eval_fvu" in r}
    by_step.update({r["step"]: r for r in history or []})
    evals = [by_step[k] for k in sorted(by_step)]
    doc = {
        "headline": headline(eval_results, feature_stats),
        "replacement": eval_results,
        "feature_stats": feature_stats,
        "training": {"logged_steps": len(train), "last": train[-1] if train else None},
        "evaluations": evals,
    }
    written = {"eval.json": folder / "eval.json"}
    written["eval.json"].write_text(json.dumps(_json_safe(doc), indent=2) + "\n", encoding="utf-8")
    plots = {
        "loss_fvu.png": lambda f: _plot_loss_fvu(f, train, evals),
        "l0_per_layer.png": lambda f: _plot_l0(f, feature_stats, train, eval_results),
        "density_histogram.png": lambda f: _plot_density(f, feature_stats, eval_results),
        "fvu_vs_l0.png": lambda f: _plot_fvu_vs_l0(
            f, train, evals, quality_reference() if reference is None else reference
        ),
        "ce_recovered_per_layer.png": lambda f: _plot_ce_recovered(f, eval_results),
        "decoder_norm_by_offset.png": lambda f: _plot_offsets(f, feature_stats),
    }
    from matplotlib.figure import Figure

    for name, draw in plots.items():
        fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
        if draw(fig):
            fig.savefig(folder / name)
            written[name] = folder / name
    return written


# --- plots: each returns False when it has nothing to draw ------------------------------------
def _layer_labels(eval_results: dict | None, n: int) -> list[str]:
    layers = (eval_results or {}).get("layers") or list(range(n))
    return [str(x) for x in layers][:n] if len(layers) >= n else [str(i) for i in range(n)]


def _ticks(n: int, most: int = 10) -> list[int]:
    """At most ``most`` readable integer ticks over ``range(n)``, the last one included."""
    return list(range(0, n, max(1, math.ceil(n / most))))


def _layer_colors(fig, ax, n: int, labels: list[str]):
    """(colormap over ``n`` layers, their labels) with a colorbar naming the layers beside ``ax``."""
    from matplotlib import cm, colormaps, colors

    cmap = colormaps["viridis"].resampled(max(n, 1))
    if n > 1:
        sm = cm.ScalarMappable(norm=colors.Normalize(-0.5, n - 0.5), cmap=cmap)
        bar = fig.colorbar(sm, ax=ax, pad=0.01, label="layer")
        bar.set_ticks(_ticks(n, 8), labels=[labels[i] for i in _ticks(n, 8)])
    return cmap, labels


def _plot_loss_fvu(fig, train: list[dict], evals: list[dict]) -> bool:
    if not train:
        return False
    steps = [r["step"] for r in train]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, [_num(r.get("loss")) for r in train], color="k", lw=1.8, label="total")
    for k in sorted({k for r in train for k in r if k.startswith("loss_")}):
        vals = [_num(r.get(k)) for r in train]
        if any(v > 0 for v in vals):
            ax1.plot(steps, vals, lw=1, label=k.removeprefix("loss_"))
    ax1.set_yscale("log")
    ax1.set(title="Training loss", xlabel="step", ylabel="loss (log scale)")
    ax1.legend(fontsize=8)
    per = [r.get("fvu_per_layer") for r in train]
    n = max((len(p) for p in per if p), default=0)
    cmap, labels = _layer_colors(fig, ax2, n, _layer_labels(evals[-1] if evals else None, n))
    for i in range(n):
        vals = [_num(p[i]) if p and i < len(p) else math.nan for p in per]
        ax2.plot(steps, vals, lw=0.9, alpha=0.8, color=cmap(i))
        if vals and math.isfinite(vals[-1]) and vals[-1] > 1:  # worse than predicting the mean: name it
            ax2.annotate(f"layer {labels[i]}", (steps[-1], vals[-1]), fontsize=7, color=cmap(i),
                         xytext=(3, 0), textcoords="offset points", va="center")  # fmt: skip
    ax2.plot(steps, [_num(r.get("fvu")) for r in train], color="k", lw=1.8, label="mean (train batch)")
    if evals:
        ax2.plot(
            [r["step"] for r in evals],
            [_num(r.get("eval_fvu")) for r in evals],
            "r*",
            ms=9,
            label="held-out eval",
        )
    ax2.set_yscale("log")
    ax2.set(title="Fraction of variance unexplained", xlabel="step", ylabel="FVU (log scale)")
    ax2.legend(fontsize=7)
    return True


def _plot_l0(fig, fs: dict | None, train: list[dict], ev: dict | None) -> bool:
    last = next((r["l0_per_layer"] for r in reversed(train) if r.get("l0_per_layer")), None)
    fs = fs if fs and fs.get("l0_per_layer") else None
    vals = fs["l0_per_layer"] if fs else last
    if not vals:
        return False
    ax = fig.subplots()
    x = list(range(len(vals)))
    if fs:
        ax.bar(x, vals, color="tab:blue", label=f"held-out eval ({fs['tokens']} tokens)")
    if last:
        ax.plot(
            list(range(len(last))),
            last,
            "o",
            color="tab:orange",
            label=f"training batch, step {next(r['step'] for r in reversed(train) if r.get('l0_per_layer'))}",
        )
    ax.set_xticks(x, _layer_labels(ev, len(vals)))
    ax.set(title="Active features per token (L0) by layer", xlabel="LLM layer", ylabel="L0")
    ax.legend()
    return True


def _plot_density(fig, fs: dict | None, ev: dict | None) -> bool:
    if not fs or not fs.get("density_hist"):
        return False
    h = fs["density_hist"]
    edges = h["log10_edges"]
    ax = fig.subplots()
    n = len(h["counts_per_layer"])
    cmap, labels = _layer_colors(fig, ax, n, _layer_labels(ev, n))
    for i, counts in enumerate(h["counts_per_layer"]):
        label = f"layer {labels[i]} ({h['dead_per_layer'][i]} dead)" if n <= 8 else None
        ax.stairs(counts, edges, lw=1.4, color=cmap(i), label=label)
    ax.axvline(
        math.log10(fs["dense_threshold"]),
        color="gray",
        ls="--",
        lw=1,
        label=f"dense threshold {fs['dense_threshold']:g}",
    )
    # A feature seen once fires at 1/tokens: nothing lies to the left of that.
    ax.set_xlim(max(edges[0], math.floor(-math.log10(max(fs["tokens"], 1))) - 0.5), edges[-1] + 0.1)
    dead = sum(h["dead_per_layer"])
    ax.set(
        title=f"Feature firing frequency on {fs['tokens']} held-out tokens ({dead} dead, not shown)",
        xlabel="log10 firing frequency",
        ylabel="features",
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # off the data
    return True


QUALITY_REFERENCE = Path(__file__).with_name("quality_reference.json")


def quality_reference() -> list[dict[str, Any]]:
    """The quality benchmark's rows (``scripts/benchmark_quality.py``, copied into the package
    with ``--write-reference``) as FVU–L0 points; [] when none are shipped."""
    if not QUALITY_REFERENCE.is_file():
        return []
    doc = json.loads(QUALITY_REFERENCE.read_text(encoding="utf-8"))
    recipe = doc.get("recipe", "quality benchmark")
    return [
        {"label": r["row"], "recipe": recipe, "l0": r["l0"], "fvu": r["fvu"]}
        for r in doc.get("rows", [])
        if _finite(r.get("l0")) and _finite(r.get("fvu"))
    ]


def _plot_fvu_vs_l0(fig, train: list[dict], evals: list[dict], reference: list[dict] | None = None) -> bool:
    pts = [(r["l0"], r["fvu"], r["step"]) for r in train if _finite(r.get("l0")) and _finite(r.get("fvu"))]
    epts = [
        (r["eval_l0"], r["eval_fvu"], r["step"])
        for r in evals
        if _finite(r.get("eval_l0")) and _finite(r.get("eval_fvu"))
    ]
    if not pts and not epts:
        return False
    ax = fig.subplots()
    if pts:
        sc = ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            c=[p[2] for p in pts],
            cmap="viridis",
            s=18,
            label="training batches",
        )
        fig.colorbar(sc, ax=ax, label="step")
    if epts:
        ax.plot(
            [p[0] for p in epts],
            [p[1] for p in epts],
            "r*-",
            ms=11,
            lw=1,
            label="held-out evals (labelled by step)",
        )
        for l0, fvu, step in epts:
            ax.annotate(f"{step}", (l0, fvu), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for i, r in enumerate(reference or []):
        legend = f"quality benchmark rows ({r.get('recipe', '')})" if i == 0 else None
        ax.plot([r["l0"]], [r["fvu"]], "D", color="0.45", ms=6, label=legend)
        # rows often sit close together: stagger their labels
        ax.annotate(
            r["label"],
            (r["l0"], r["fvu"]),
            textcoords="offset points",
            xytext=(6, 8 - 10 * (i % 3)),
            fontsize=7,
            color="0.35",
        )
    ax.set_yscale("log")
    ax.set(
        title="Sparsity vs reconstruction over training",
        xlabel="L0 (mean over layers)",
        ylabel="FVU (mean over layers, log scale)",
    )
    ax.legend()
    return True


def _plot_ce_recovered(fig, ev: dict | None) -> bool:
    if not ev or "open_loop" not in ev:
        return False
    o = ev["open_loop"]
    n = len(o["ce_recovered_zero"])
    x = list(range(n))
    ax = fig.subplots()
    w = 0.38
    ax.bar(
        [i - w / 2 for i in x],
        [_num(v) for v in o["ce_recovered_zero"]],
        w,
        label="open loop vs zero-ablation",
    )
    ax.bar(
        [i + w / 2 for i in x],
        [_num(v) for v in o["ce_recovered_mean"]],
        w,
        label="open loop vs mean-ablation",
    )
    c = ev["closed_loop"]
    ax.axhline(
        _num(c["ce_recovered_zero"]),
        color="tab:blue",
        ls="--",
        lw=1.2,
        label=f"closed loop, all layers, vs zero: {_num(c['ce_recovered_zero']):.3f}",
    )
    ax.axhline(
        _num(c["ce_recovered_mean"]),
        color="tab:orange",
        ls=":",
        lw=1.5,
        label=f"closed loop, all layers, vs mean: {_num(c['ce_recovered_mean']):.3f}",
    )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(x, _layer_labels(ev, n))
    ax.set(
        title=f"CE recovered by the replacement (clean CE {ev['ce_clean']:.3f} nats)",
        xlabel="LLM layer replaced (open loop: that layer alone)",
        ylabel="CE recovered",
    )
    ax.legend(fontsize=8, loc="lower left")
    return True


def _plot_offsets(fig, fs: dict | None) -> bool:
    d = (fs or {}).get("decoder_norm_by_offset")
    if not d:
        return False
    import numpy as np

    share = np.array([[_num(v) for v in row] for row in d["share"]])
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(share, cmap="magma", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax1, label="share of squared decoder norm")
    L = share.shape[0]
    ticks = _ticks(L)
    ax1.set_xticks(ticks)
    ax1.set_yticks(ticks)
    if L <= 12:  # small enough to print the numbers in the cells
        for s_ in range(L):
            for o in range(L - s_):
                v = share[s_, o]
                ax1.text(
                    o,
                    s_,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if v > 0.6 else "white",
                )
    ax1.set(title="Where each source writes", xlabel="target offset t − s", ylabel="source layer s")
    p = d["per_offset"]
    ax2.fill_between(p["offset"], p["p10"], p["p90"], alpha=0.3, label="10–90th percentile")
    ax2.plot(p["offset"], p["p50"], "o-", label="median")
    ax2.plot(p["offset"], p["mean"], "k--", lw=1, label="mean")
    ax2.set(
        title="Feature decoder norm by offset",
        xlabel="target offset t − s",
        ylabel="‖W_dec,s→s+o‖ (raw units)",
    )
    ax2.set_xticks(_ticks(len(p["offset"])))
    ax2.legend(fontsize=8)
    return True


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
