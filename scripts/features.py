#!/usr/bin/env python
"""Feature examples for any run or export: top-activating contexts, density and the output tokens
each feature's decoder promotes, from one streaming pass over held-out text.

  .venv/bin/python scripts/features.py outputs/demo_smollm2_clt                 # -> <run>/features
  .venv/bin/python scripts/features.py outputs/<job>/export --tokens 65536 --examples 16
  .venv/bin/python scripts/features.py my_export --model gguf:FILE --data shakespeare --out feats
  .venv/bin/python scripts/features.py outputs/demo_smollm2_clt --text "To be, or not to be"
  .venv/bin/python scripts/features.py outputs/demo_smollm2_clt --text "..." --feature L7/F106

Writes circuit-tracer's ``features/{id}.json`` files (``scripts/trace.py`` copies the ones a graph
uses beside it, so circuit-tracer's UI shows their examples) and a static browser
``features/index.html`` (open it in a browser; no server needed). The text is the held-out part
of the run's dataset (documents the training stream never read), or ``--data``. From a run
folder the dictionary is its ``circuit_tracer/`` export when there is one (the JumpReLU form
circuit-tracer traces with), else ``export/``, else the latest checkpoint.

``--text`` runs the dictionary on your own text instead: each token with its strongest features
(and their labels when the run has ``features/``), or with ``--feature L7/F106`` that feature's
activation on each token. From Python: ``features_on_text(path, text, feature=None)`` here, or
``torchtitan_clt.metrics.feature_examples.activations_on_text(transcoder, llm, text)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def feature_pass(
    path, out=None, tokens=16384, examples=8, model=None, data=None, batch=8, progress=True, skip=None
):
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
    skip = cfg.eval.feature_skip_positions if skip is None else skip
    return run_feature_pass(transcoder, llm, batches, tokens, out, examples, meta, progress, skip)


def parse_feature(spec: str, layers: list[int]) -> tuple[int, int]:
    """``L7/F106`` (LLM layer 7, feature 106) -> (row of the dictionary's layers, feature)."""
    import re

    m = re.fullmatch(r"[lL]?(\d+)\s*[/_:]\s*[fF]?(\d+)", spec.strip())
    if m is None:
        raise ValueError(f"--feature {spec!r}: write it as L7/F106 (LLM layer 7, feature 106).")
    layer, index = int(m[1]), int(m[2])
    if layer not in layers:
        raise ValueError(f"--feature {spec}: layer {layer} is not one of the dictionary's layers {layers}.")
    return layers.index(layer), index


def features_on_text(path, text, feature=None, top=5, model=None, out=sys.stdout):
    """Print each token of ``text`` with its ``top`` strongest features (their labels when the
    run has ``features/``), or with ``feature``'s (``L7/F106``) activation; returns
    ``(tokens, acts [T-1, L, F], layers)``."""
    from torchtitan_clt.checkpoint.run_inputs import find_run, load_dictionary, run_config
    from torchtitan_clt.data.pipeline import load_llm_handle
    from torchtitan_clt.metrics.feature_examples import activations_on_text
    from torchtitan_clt.metrics.feature_files import TokenText, cantor, feature_labels

    transcoder, _ = load_dictionary(path)
    a = transcoder.args
    layers = list(a.layers or range(a.n_layers))
    want = parse_feature(feature, layers) if feature else None  # refused before the LLM loads
    if want is not None and not 0 <= want[1] < a.features_per_layer:
        raise ValueError(
            f"--feature {feature}: the dictionary has {a.features_per_layer} features per layer."
        )
    run = find_run(path)
    llm = load_llm_handle(run_config(run, model, None), "cpu", "float32")
    ids, acts = activations_on_text(transcoder, llm, text)
    toks = TokenText(llm.tokenizer)(ids[1:])
    labels = feature_labels(run / "features") if run is not None and (run / "features").is_dir() else {}
    F = a.features_per_layer
    for t, (tok, row) in enumerate(zip(toks, acts)):
        if want is not None:
            v = float(row[want])
            print(f"{t + 1:4d} {tok!r:>16} {v:8.3f} {'#' * min(40, round(v * 10))}", file=out)
            continue
        vals, idx = row.reshape(-1).topk(min(top, row.numel()))
        cells = []
        for v, n in zip(vals.tolist(), idx.tolist()):
            if v <= 0:
                break
            j, i = divmod(n, F)
            label = labels.get(cantor(layers[j], i))
            cells.append(f"L{layers[j]}/F{i} {v:.2f}" + (f" {label}" if label else ""))
        print(f"{t + 1:4d} {tok!r:>16}  " + ("  |  ".join(cells) or "(none)"), file=out)
    return toks, acts, layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_EXPORT")
    p.add_argument("--out", default=None, help="output folder (default: <run>/features)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens to read")
    p.add_argument("--examples", type=int, default=8, help="top contexts kept per feature")
    p.add_argument("--batch", type=int, default=8, help="contexts per LLM forward")
    p.add_argument("--model", default=None, help="LLM (default: the run's data.model_path)")
    p.add_argument("--data", default=None, help="text (default: the run's data.dataset, held out)")
    p.add_argument(
        "--skip-positions",
        type=int,
        default=None,
        help="positions after BOS examples are not taken from (default: the run's eval.feature_skip_positions)",
    )
    p.add_argument("--text", default=None, help="your own text: print each token's top features instead")
    p.add_argument("--feature", default=None, help="with --text: one feature's activations, e.g. L7/F106")
    p.add_argument("--top", type=int, default=5, help="with --text: features printed per token")
    a = p.parse_args(argv)
    if a.feature and a.text is None:
        print("features: --feature needs --text (the text to run it on).", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from torchtitan_clt.config.manager import ConfigError

    try:
        if a.text is not None:
            features_on_text(a.path, a.text, a.feature, a.top, a.model)
            return 0
        summary = feature_pass(
            a.path, a.out, a.tokens, a.examples, a.model, a.data, a.batch, skip=a.skip_positions
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"features: {e}", file=sys.stderr)
        return 2
    keys = ("tokens", "tokens_asked", "features", "fired", "dead_frac", "features_with_8_contexts")
    print(json.dumps({k: summary[k] for k in (*keys, "top_example_after_bos_frac", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
