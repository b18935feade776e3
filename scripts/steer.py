#!/usr/bin/env python
"""Steer or ablate a feature and see the LLM's output change, through the traced replacement model.

  .venv/bin/python scripts/steer.py outputs/demo_smollm2_clt --prompt "The capital of France is" \\
      --feature L7/F106 --scale 4
  .venv/bin/python scripts/steer.py outputs/demo_smollm2_clt --prompt "..." --feature L7/F106 --ablate
  .venv/bin/python scripts/steer.py RUN --prompt "..." --feature L3/F17 --value 2.5   # turn a silent one on

RUN_OR_EXPORT is a run folder (its ``circuit_tracer/`` export: the features the graphs show; else
its native ``export/``) or a circuit-tracer folder. Prints the next-token distribution before and
after, the tokens whose probability moved most, KL(before ‖ after), and a greedy continuation of
``--tokens`` tokens before and after (``torchtitan_clt.tracing.steer``: the feature's change times
its decoder is added to the MLP outputs it writes; the rest of the LLM runs as usual). ``--json``
prints the result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_transcoder(path: Path):
    """(transcoder, run folder) for RUN_OR_EXPORT."""
    from torchtitan_clt.checkpoint.circuit_tracer import load_circuit_tracer
    from torchtitan_clt.checkpoint.run_inputs import circuit_tracer_folder, find_run

    folder = circuit_tracer_folder(path)
    if folder is not None:
        return load_circuit_tracer(folder), find_run(folder)
    run = find_run(path)
    if run is not None and (run / "export" / "config.json").is_file():
        from torchtitan_clt import load_pretrained

        return load_pretrained(run / "export").eval(), run
    raise FileNotFoundError(
        f"{path}: no circuit_tracer/ or export/ to steer with; export the run first "
        f"(scripts/export.py {path} --format both)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, metavar="RUN_OR_EXPORT")
    p.add_argument("--prompt", required=True)
    p.add_argument("--feature", required=True, action="append", help="L<layer>/F<index> (repeatable)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="multiply the feature's activation by this")
    how.add_argument("--ablate", action="store_true", help="set it to 0 (same as --scale 0)")
    how.add_argument("--value", type=float, help="set it to this at every position but BOS")
    p.add_argument("--tokens", type=int, default=12, help="greedy continuation length")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--model", default=None, help="LLM (default: the run's data.model_path)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from torchtitan_clt.checkpoint.run_inputs import run_config
    from torchtitan_clt.data.llm import load_llm
    from torchtitan_clt.tracing.steer import FeatureSteerer, Intervention, distribution_change, parse_feature

    try:
        ivs = [parse_feature(f) for f in a.feature]
        tc, run = load_transcoder(a.path)
        cfg = run_config(run, a.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"steer: {e}", file=sys.stderr)
        return 2
    scale = 0.0 if a.ablate else a.scale
    interventions = [Intervention(layer, f, scale=scale, value=a.value) for layer, f in ivs]
    llm, tokenizer = load_llm(cfg.data.model_path, "float32", "cpu")
    steerer = FeatureSteerer(llm.eval(), tc)
    try:
        for iv in interventions:
            steerer.row_of(iv.layer)  # a layer without features: say so before running
            if not 0 <= iv.feature < tc.args.features_per_layer:
                raise ValueError(f"feature {iv.feature} does not exist (F = {tc.args.features_per_layer}).")
    except ValueError as e:
        print(f"steer: {e}", file=sys.stderr)
        return 2
    tokens = tokenizer(a.prompt, return_tensors="pt").input_ids
    for ref, iv in zip(a.feature, interventions):
        acts = steerer.feature_activations(tokens, iv.layer, iv.feature)
        print(f"{ref} on the prompt's tokens (BOS first): " + " ".join(f"{v:.3g}" for v in acts.tolist()))
        if iv.scale is not None and not bool((acts[1:] != 0).any()):
            print(f"  {ref} is silent on this prompt: scaling changes nothing; --value V turns it on.")
    before = steerer.next_token_probs(tokens)
    after = steerer.next_token_probs(tokens, interventions)
    change = distribution_change(before, after, tokenizer, a.top)
    gen = {
        k: tokenizer.decode(steerer.generate(tokens, a.tokens, ivs_)[0])
        for k, ivs_ in (("before", []), ("after", interventions))
    }
    what = "ablated" if scale == 0 else f"× {scale:g}" if scale is not None else f"set to {a.value:g}"
    print(
        f"{', '.join(a.feature)} {what} on {a.prompt!r} (KL before ‖ after {change['kl_before_after']:.4f} nats)"
    )
    print(f"  {'before':<28} after")
    for (t0, p0), (t1, p1) in zip(change["before"], change["after"]):
        print(f"  {t0!r:<18} {p0:7.4f}   {t1!r:<18} {p1:7.4f}")
    print("  moved most: " + ", ".join(f"{t!r} {p0:.4f} -> {p1:.4f}" for t, p0, p1 in change["moved"][:5]))
    print(f"  continuation before: {gen['before']!r}\n  continuation after:  {gen['after']!r}")
    if a.json:
        print(
            json.dumps(
                {
                    "prompt": a.prompt,
                    "features": a.feature,
                    "scale": scale,
                    "value": a.value,
                    **change,
                    "generation": gen,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
