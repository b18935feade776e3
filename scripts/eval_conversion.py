"""Measure a TopK / BatchTopK -> JumpReLU conversion on held-out activations.

    .venv/bin/python scripts/eval_conversion.py outputs/<job> --calib-tokens 4096 --eval-tokens 8192

Calibrates on the run's training text (``--calib-tokens``, read from the start of the training
documents) and measures L0 and FVU per layer, source vs converted, on the documents the training
stream holds out (``--eval-tokens``): text neither the dictionary nor the calibration read. One
row per setting (``--variants``: ``THRESHOLDS:STEPS[:OPTION=VALUE...]``, ``refit=0|1`` among the options, e.g. ``feature:0
match:0 match:300:fit_gain=1 feature:0:min_firings=1``, other options going to
``threshold_fit.fit_thresholds``; ``default`` is ``to_jumprelu``'s defaults: for BatchTopK its
native inference threshold, fitted first on the calibration rows as at the end of a run). Each
row also holds ``native`` / ``export``: held-out L0, FVU and the share of features that never
fire, of the model as the native export loads it and of the JumpReLU export. Prints a table and writes
``<out>/conversion.json`` (default ``<run>/report``). ``--cache FILE`` keeps the extracted
activations, so that trying other settings skips the LLM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _activations(cfg, model, calib_tokens: int, eval_tokens: int, cache: Path | None):
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        if saved["calib_tokens"] >= calib_tokens and saved["eval_tokens"] >= eval_tokens:
            return saved["calib"], saved["held_out"]
    from torchtitan_clt.checkpoint.calibration import activation_batches
    from torchtitan_clt.data.pipeline import load_llm_handle

    a = model.args
    kw = dict(llm=load_llm_handle(cfg, "cpu"), layers=list(a.layers), hooks=(a.hook_in, a.hook_out))
    calib = activation_batches(cfg, calib_tokens, "train", **kw)
    held = activation_batches(cfg, eval_tokens, "held_out", **kw)
    if cache is not None:
        torch.save(
            {"calib_tokens": calib_tokens, "eval_tokens": eval_tokens, "calib": calib, "held_out": held},
            cache,
        )
    return calib, held


def _variant(spec: str) -> dict:
    """``THRESHOLDS:STEPS[:OPTION=VALUE...]`` -> ``to_jumprelu`` keyword arguments."""
    th, steps, *opts = spec.split(":")
    options, kw = {}, {}
    for kv in opts:
        k, v = kv.split("=")
        if k == "refit":  # refit=0|1: to_jumprelu's refit_decoder
            kw["refit_decoder"] = v in ("1", "true")
            continue
        if k == "min_firings":  # the per-feature fit's fallback to the layer threshold
            kw["min_firings"] = int(v)
            continue
        options[k] = v in ("1", "true") if k.startswith("fit_") else float(v) if "." in v else int(v)
    return {"thresholds": th, "refine_steps": int(steps), "refine_options": options, **kw}


def _skip(batches, tokens: int):
    """The rows after the first ``tokens``."""
    out, n = [], 0
    for x, y in batches:
        k = max(0, min(x.shape[0], tokens - n))
        if k < x.shape[0]:
            out.append((x[k:], y[k:]))
        n += x.shape[0]
    return out


def _trim(batches, tokens: int):
    out, n = [], 0
    for x, y in batches:
        if n >= tokens:
            break
        out.append((x[: tokens - n], y[: tokens - n]))
        n += min(x.shape[0], tokens - n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="run folder or checkpoint step-N folder")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--variants", nargs="*", default=["feature:0:min_firings=1", "feature:0", "default"])
    p.add_argument("--cache", type=Path, default=None, help="activation cache file (.pt)")
    p.add_argument(
        "--eval-split",
        choices=["held_out", "train"],
        default="held_out",
        help="held_out: the documents training never read; train: the training rows right after the "
        "calibration rows (never used to fit; for a dataset whose held-out part is small)",
    )
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    from torchtitan_clt.checkpoint.export import folded_cpu_copy
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint, resolve_checkpoint
    from torchtitan_clt.config.manager import load_config
    from torchtitan_clt.models.conversion import (
        describe_batchtopk_fit,
        fit_batchtopk_threshold,
        side_by_side,
        to_jumprelu,
    )

    torch.manual_seed(0)
    ckpt, run = resolve_checkpoint(a.path, a.step)
    model, meta = load_model_from_checkpoint(ckpt)
    model = folded_cpu_copy(model)
    cfg = load_config(["--config", str(run / "config.toml")], check=False)
    extra = a.eval_tokens if a.eval_split == "train" else 0
    calib, held = _activations(cfg, model, a.calib_tokens + extra, a.eval_tokens, a.cache)
    if a.eval_split == "train":
        held = _skip(calib, a.calib_tokens)
    calib, held = _trim(calib, a.calib_tokens), _trim(held, a.eval_tokens)
    fit = fit_batchtopk_threshold(model, calib)  # BatchTopK: its inference threshold, as a run's end fits it
    if fit is not None:
        print(describe_batchtopk_fit(fit))
    rows = []
    for v in a.variants:
        kw = {} if v == "default" else _variant(v)
        t0 = time.perf_counter()
        _, rep = to_jumprelu(model, calib, eval_batches=held, **kw)
        rep = {k: v for k, v in rep.items() if k != "refine_history"}
        rows.append(
            {
                "variant": v,
                "converted_family": rep.pop("family", None),
                "family": model.args.family,
                "activation": model.args.activation,
                "k": model.args.k,
                "step": meta.get("step"),
                "calib_tokens": sum(x.shape[0] for x, _ in calib),
                "seconds": round(time.perf_counter() - t0, 1),
                **rep,
            }
        )
        r = rows[-1]
        n, e = side_by_side(r) or ({}, {})
        print(
            f"{r['family']:<15} {r['activation']:<10} {v:<14} L0 {r['l0_before_mean']:7.2f} -> "
            f"{r['l0_after_mean']:7.2f}  FVU {r['fvu_before_mean']:.4f} -> {r['fvu_after_mean']:.4f} "
            f"({100 * (r['fvu_after_mean'] / r['fvu_before_mean'] - 1):+.1f}%)  "
            f"eval {r['eval_tokens']} / calib {r['calib_tokens']} tokens, {r['seconds']} s\n"
            f"{'':<27} native vs export: L0 {n.get('l0', float('nan')):.2f} / {e.get('l0', float('nan')):.2f}  "
            f"FVU {n.get('fvu', float('nan')):.4f} / {e.get('fvu', float('nan')):.4f}  never firing "
            f"{100 * n.get('never_fire', float('nan')):.1f}% / {100 * e.get('never_fire', float('nan')):.1f}%",
            flush=True,
        )
    out = a.out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "conversion.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"Wrote {out / 'conversion.json'}")
    return 0


if __name__ == "__main__":
    from torchtitan_clt.tools.exit_codes import user_errors

    with user_errors("eval_conversion"):  # a missing or damaged input: one line, exit 2
        sys.exit(main())
