#!/usr/bin/env python
"""Feature examples for any run or export: top-activating contexts, density and the output tokens
each feature's decoder promotes, from one streaming pass over held-out text.

  .venv/bin/python scripts/features.py outputs/demo_smollm2_clt                 # -> <run>/features
  .venv/bin/python scripts/features.py outputs/<job>/export --tokens 65536 --examples 16
  .venv/bin/python scripts/features.py my_export --model gguf:FILE --data shakespeare --out feats

Writes circuit-tracer's ``features/{id}.json`` files (``scripts/trace.py`` copies the ones a graph
uses beside it, so circuit-tracer's UI shows their examples) and a static browser
``features/index.html`` (open it in a browser; no server needed). The text is the held-out part
of the run's dataset (documents the training stream never read), or ``--data``. From a run
folder the dictionary is its ``circuit_tracer/`` export when there is one (the JumpReLU form
circuit-tracer traces with), else ``export/``, else the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def feature_pass(path, out=None, tokens=16384, examples=8, model=None, data=None, batch=8, progress=True):
    """Load ``path`` (run or export) and its LLM, run the pass, write ``out``; returns the summary."""
    from torchtitan_clt.checkpoint.run_inputs import find_run, load_dictionary, run_config
    from torchtitan_clt.data.pipeline import load_llm_handle, token_loader
    from torchtitan_clt.metrics.feature_files import run_feature_pass

    transcoder, source = load_dictionary(path)
    run = find_run(path)
    cfg = run_config(run, model, data)
    llm = load_llm_handle(cfg, "cpu", "float32")
    out = Path(out) if out else (run if run is not None else Path(path).parent) / "features"
    batches = token_loader(cfg, llm.tokenizer, batch, held_out=True)
    meta = {"name": run.name if run is not None else Path(path).name, "dictionary": str(source)}
    return run_feature_pass(transcoder, llm, batches, tokens, out, examples, meta, progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_EXPORT")
    p.add_argument("--out", default=None, help="output folder (default: <run>/features)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens to read")
    p.add_argument("--examples", type=int, default=8, help="top contexts kept per feature")
    p.add_argument("--batch", type=int, default=8, help="contexts per LLM forward")
    p.add_argument("--model", default=None, help="LLM (default: the run's data.model_path)")
    p.add_argument("--data", default=None, help="text (default: the run's data.dataset, held out)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from torchtitan_clt.config.manager import ConfigError

    try:
        summary = feature_pass(a.path, a.out, a.tokens, a.examples, a.model, a.data, a.batch)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"features: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("tokens", "features", "fired", "dead_frac", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
