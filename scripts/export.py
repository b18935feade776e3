"""Export any saved checkpoint step (native and/or circuit-tracer), in one process on the CPU.

  .venv/bin/python scripts/export.py outputs/<job>                       # latest complete step
  .venv/bin/python scripts/export.py outputs/<job> --step 500 --format circuit_tracer --dtype bfloat16
  .venv/bin/python scripts/export.py outputs/<job>/checkpoints/step-500 --out /tmp/x

Writes ``<out>/export`` (native: ``load_pretrained``) and / or ``<out>/circuit_tracer``; ``--out``
defaults to ``<run>/exports/step-N``. A checkpoint saved on any number of ranks loads here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_checkpoint(
    path: str | Path,
    step: int | None = None,
    fmt: str = "both",
    dtype: str | None = None,
    out: str | Path | None = None,
) -> dict[str, Path]:
    """Load ``path`` (a run folder or a ``step-N`` folder) and export it; returns {format: folder}."""
    from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer
    from torchtitan_clt.checkpoint.export import export_native
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint, resolve_checkpoint

    if fmt not in ("native", "circuit_tracer", "both"):
        raise ValueError(f"--format must be native, circuit_tracer or both (got {fmt!r}).")
    ckpt, run = resolve_checkpoint(path, step)
    model, meta = load_model_from_checkpoint(ckpt)
    if dtype is None:
        dtype = "float32"
        if run is not None:
            from torchtitan_clt.config.manager import load_config

            dtype = load_config(["--config", str(run / "config.toml")], check=False).checkpoint.export_dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r}).")
    out = Path(out) if out is not None else (run or ckpt.parent.parent) / "exports" / f"step-{meta['step']}"
    written: dict[str, Path] = {}
    extra = {"checkpoint": str(ckpt), "step": meta["step"]}
    if fmt in ("native", "both"):
        written["native"] = export_native(model, out / "export", dtype=DTYPES[dtype], extra_meta=extra)
    if fmt in ("circuit_tracer", "both"):
        written["circuit_tracer"] = export_circuit_tracer(model, out / "circuit_tracer", dtype=DTYPES[dtype])
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run folder (outputs/<job>) or checkpoint folder (.../checkpoints/step-N)")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the latest complete)")
    p.add_argument("--format", default="both", choices=["native", "circuit_tracer", "both"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: checkpoint.export_dtype")
    p.add_argument("--out", default=None, help="output folder (default: <run>/exports/step-N)")
    a = p.parse_args(argv)
    try:
        written = export_checkpoint(a.path, a.step, a.format, a.dtype, a.out)
    except (FileNotFoundError, ValueError) as e:  # ConfigError and CircuitTracerExportError too
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in written.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
