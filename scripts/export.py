"""Export any saved checkpoint step (native, circuit-tracer, SAELens), in one process on the CPU.

  .venv/bin/python scripts/export.py outputs/<job>                       # latest complete step
  .venv/bin/python scripts/export.py outputs/<job> --step 500 --format circuit_tracer --dtype bfloat16
  .venv/bin/python scripts/export.py outputs/<job>/checkpoints/step-500 --out /tmp/x
  .venv/bin/python scripts/export.py outputs/<job> --format saelens      # SAE / PLT: <out>/saelens/layer_N

Writes ``<out>/export`` (native: ``load_pretrained``) and / or ``<out>/circuit_tracer``; ``--out``
defaults to ``<run>/exports/step-N``. A checkpoint saved on any number of ranks loads here.

A TopK / BatchTopK model goes to circuit-tracer as JumpReLU, its thresholds calibrated on
``--calib-tokens`` tokens of the run's training text (its LLM and dataset, from config.toml) and
the result measured on ``--eval-tokens`` held-out tokens: ``circuit_tracer/conversion.json``. With
``--calib-tokens 0``, or when the LLM or the text cannot be read, the tracked per-layer threshold is
exported instead, with a warning. A BatchTopK model's inference threshold is fitted on the same
training rows (k features per token and layer on them, as at the end of a run) before any export.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXPORT_DTYPES = ("float32", "bfloat16")  # of tools.dtypes.DTYPES
FORMATS = ["native", "circuit_tracer", "both", "saelens"]
logger = logging.getLogger("export")


def conversion_batches(run: Path | None, model, calib_tokens: int, eval_tokens: int):
    """(calibration, held-out) raw activation batches for a TopK / BatchTopK model (its JumpReLU
    conversion, and BatchTopK's inference threshold), from the run's LLM and text; ([], None)
    with a warning when they cannot be had."""
    from torchtitan_clt.checkpoint.calibration import run_batches
    from torchtitan_clt.models.activations import BatchTopK, TopK

    if not isinstance(model.activation, (TopK, BatchTopK)):
        return [], None
    return run_batches(run, model, calib_tokens, eval_tokens, why="export")


CROSSLAYER_FAMILIES = ("clt", "matryoshka_clt")  # built-ins whose features write to every later layer


def refuse_early(ckpt: Path, fmt: str) -> None:
    """Refusals the checkpoint's ``meta.json`` settles, before the model, the LLM or any
    calibration text is loaded (sae-lens has no form for a crosslayer transcoder)."""
    from torchtitan_clt.checkpoint.layout import META_FILE

    if fmt != "saelens" or not (ckpt / META_FILE).is_file():
        return
    args = json.loads((ckpt / META_FILE).read_text()).get("model_args") or {}
    if args.get("family") in CROSSLAYER_FAMILIES:
        raise ValueError(
            f"--format saelens: model.name={args['family']!r} is a crosslayer transcoder (its features write "
            "to every later layer) and sae-lens stores one encoder and one decoder per layer (SAEs and "
            "per-layer transcoders only). Use --format native (load_pretrained) or circuit_tracer."
        )


def export_checkpoint(
    path: str | Path,
    step: int | None = None,
    fmt: str = "both",
    dtype: str | None = None,
    out: str | Path | None = None,
    calib_tokens: int = 4096,
    eval_tokens: int = 4096,
    refine_steps: int | None = None,
) -> dict[str, Path]:
    """Load ``path`` (a run folder or a ``step-N`` folder) and export it; returns {format: folder}."""
    from torchtitan_clt.checkpoint.layout import resolve_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r}).")
    ckpt, run = resolve_checkpoint(path, step)
    refuse_early(ckpt, fmt)  # before torch, the model and the LLM load
    from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer
    from torchtitan_clt.checkpoint.export import export_native
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint
    from torchtitan_clt.models.conversion import describe_batchtopk_fit, fit_batchtopk_threshold
    from torchtitan_clt.tools.dtypes import DTYPES

    model, meta = load_model_from_checkpoint(ckpt)
    if dtype is None:
        dtype = "float32"
        if run is not None:
            from torchtitan_clt.config.manager import load_config

            dtype = load_config(["--config", str(run / "config.toml")], check=False).checkpoint.export_dtype
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)} (got {dtype!r}).")
    out = Path(out) if out is not None else (run or ckpt.parent.parent) / "exports" / f"step-{meta['step']}"
    written: dict[str, Path] = {}
    extra = {"checkpoint": str(ckpt), "step": meta["step"]}
    to_ct = fmt in ("circuit_tracer", "both")
    calib, held = [], None
    if to_ct or model.args.activation == "batchtopk":  # the JumpReLU conversion; BatchTopK's threshold
        calib, held = conversion_batches(run, model, calib_tokens, eval_tokens if to_ct else 0)
    fit = fit_batchtopk_threshold(model, calib)  # BatchTopK at inference: k per token on training rows
    if fit is not None:
        extra["batchtopk_threshold"] = fit
        logger.info(describe_batchtopk_fit(fit))
    if fmt in ("native", "both"):
        written["native"] = export_native(model, out / "export", dtype=DTYPES[dtype], extra_meta=extra)
    if to_ct:
        written["circuit_tracer"] = export_circuit_tracer(
            model,
            out / "circuit_tracer",
            dtype=DTYPES[dtype],
            calibration=calib,
            eval_batches=held,
            conversion_options={} if refine_steps is None else {"refine_steps": refine_steps},
        )
    if fmt == "saelens":
        from torchtitan_clt.checkpoint.saelens import export_saelens

        written["saelens"] = export_saelens(model, out / "saelens", DTYPES[dtype], saelens_metadata(run))
    return written


def saelens_metadata(run: Path | None) -> dict:
    """cfg.json metadata the run's config knows (the text and the context length)."""
    if run is None:
        return {}
    from torchtitan_clt.config.manager import load_config

    data = load_config(["--config", str(run / "config.toml")], check=False).data
    return {} if data.source == "synthetic" else {"dataset_path": data.dataset, "context_size": data.seq_len}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run folder (outputs/<job>) or checkpoint folder (.../checkpoints/step-N)")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the latest complete)")
    p.add_argument(
        "--format",
        default="both",
        choices=FORMATS,
        help="both: native and circuit_tracer; saelens: SAE / PLT only",
    )
    p.add_argument(
        "--dtype", default=None, choices=list(EXPORT_DTYPES), help="default: checkpoint.export_dtype"
    )
    p.add_argument("--out", default=None, help="output folder (default: <run>/exports/step-N)")
    p.add_argument(
        "--calib-tokens",
        type=int,
        default=4096,
        help="TopK / BatchTopK -> JumpReLU: training-text tokens to calibrate on (0: tracked threshold)",
    )
    p.add_argument(
        "--eval-tokens", type=int, default=4096, help="held-out tokens the conversion is measured on"
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        help="TopK -> JumpReLU threshold-fit steps (default: to_jumprelu's, 300; 0: calibration only)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = export_checkpoint(
            a.path, a.step, a.format, a.dtype, a.out, a.calib_tokens, a.eval_tokens, a.refine_steps
        )
    except (FileNotFoundError, ValueError) as e:  # ConfigError and CircuitTracerExportError too
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in written.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
