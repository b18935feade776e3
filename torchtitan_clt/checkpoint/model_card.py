"""The model card (README.md) of a run pushed to the Hub, generated from the run folder.

It reads ``export/config.json`` (family, layers, hooks, sizes), ``config.toml`` (the description),
``report/eval.json`` (held-out FVU, L0, CE recovered; written at the end of training) and, when
that has no evaluation, the last ``eval_*`` line of ``metrics.jsonl``; the training tokens and
steps come from the last training line. Numbers that are missing are said to be missing, never
filled in from training batches without saying so.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

FAMILIES = {
    "clt": ("crosslayer transcoder", "crosslayer-transcoder"),
    "matryoshka_clt": ("Matryoshka crosslayer transcoder", "crosslayer-transcoder"),
    "plt": ("per-layer transcoder", "transcoder"),
    "sae": ("sparse autoencoder", "sparse-autoencoder"),
    "molt": ("mixture of linear transforms (MOLT)", "transcoder"),
}
PLOTS = {
    "loss_fvu.png": "Loss and FVU during training",
    "l0_per_layer.png": "L0 per layer",
    "density_histogram.png": "Feature firing frequency per layer",
    "fvu_vs_l0.png": "FVU against L0",
    "ce_recovered_per_layer.png": "CE recovered per layer",
    "decoder_norm_by_offset.png": "Decoder norm by target offset",
}
METRICS = [  # (key, label, format)
    ("fvu", "FVU (fraction of variance unexplained)", "{:.4f}"),
    ("l0", "L0 (active features per token and layer)", "{:.1f}"),
    ("dead_frac", "dead features", "{:.1%}"),
    (
        "dense_frac",
        "dense features (firing on more than eval.dense_threshold of tokens, default 10%)",
        "{:.1%}",
    ),
    ("ce_recovered_zero", "CE recovered (vs zero ablation)", "{:.1%}"),
    ("ce_recovered_mean", "CE recovered (vs mean ablation)", "{:.1%}"),
    ("delta_ce", "ΔCE, replacement − clean (nats)", "{:.4f}"),
    ("kl", "KL(clean ‖ replacement) (nats)", "{:.4f}"),
    ("top1_agreement", "top-1 agreement", "{:.1%}"),
]


# LLMs the presets read from a local GGUF file (their model_name is the file's stem): the Hub id of
# the full-precision model, which is what circuit-tracer and transformers load by name.
HUB_IDS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
GGUF_SUFFIX = re.compile(r"[.-](Q\d\w*|F16|F32|BF16|IQ\d\w*)$", re.I)


def hub_model_id(model_name: str) -> tuple[str, str | None]:
    """(the name to load the LLM by, a note when it is not the exact model trained on). A GGUF
    file's stem (``SmolLM2-135M-Instruct.Q4_1``) maps to its full-precision Hub id."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model_name or ""):
        return model_name, None
    base = GGUF_SUFFIX.sub("", model_name or "")
    if base in HUB_IDS:
        return HUB_IDS[base], (
            f"The dictionary was trained on the activations of `{model_name}` (a quantized GGUF file, "
            f"dequantized); `{HUB_IDS[base]}` is its full-precision original, whose activations are "
            "close to but not identical with those."
        )
    return f"<the Hub id of {model_name}>", f"`{model_name}` is a local model: give its Hub id or folder."


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fmt(fmt: str, v: Any) -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def held_out_metrics(run: Path) -> tuple[dict[str, Any], dict[str, list], str | None]:
    """(scalars, per-layer lists, where they came from) of the run's last held-out evaluation;
    ({}, {}, None) when the run has none."""
    from torchtitan_clt.metrics.report import read_metrics

    doc = _json(run / "report" / "eval.json") or {}
    head, stats = doc.get("headline") or {}, doc.get("feature_stats") or {}
    if head:
        per = {k: stats[f"{k}_per_layer"] for k in ("fvu", "l0") if f"{k}_per_layer" in stats}
        tokens = head.get("tokens_scored")
        return head, per, "report/eval.json" + (f", {tokens:,} held-out tokens" if tokens else "")
    evals = [r for r in read_metrics(run) if "eval_fvu" in r]
    if not evals:
        return {}, {}, None
    last = evals[-1]
    scalars = {k[5:]: v for k, v in last.items() if k.startswith("eval_") and not isinstance(v, list)}
    per = {k: last[f"eval_{k}_per_layer"] for k in ("fvu", "l0") if f"eval_{k}_per_layer" in last}
    return scalars, per, f"metrics.jsonl, evaluation at step {last['step']}"


def run_summary(run: str | Path) -> dict[str, Any]:
    """What the card says about ``run``: its export config, description, training extent,
    held-out metrics."""
    from torchtitan_clt.metrics.report import read_metrics

    run = Path(run)
    cfg = _json(run / "export" / "config.json")
    if cfg is None:
        raise FileNotFoundError(
            f"{run / 'export' / 'config.json'} is missing: {run} has no native export. Export a "
            f"checkpoint into the run first: scripts/export.py {run} --out {run}"
        )
    description = ""
    toml = run / "config.toml"
    if toml.is_file():
        m = re.search(r'^description\s*=\s*"(.*)"\s*$', toml.read_text(encoding="utf-8"), re.M)
        description = m.group(1) if m else ""
    train = [r for r in read_metrics(run) if "loss" in r]
    scalars, per_layer, source = held_out_metrics(run)
    return {
        "config": cfg,
        "args": cfg.get("args", {}),
        "description": description,
        "steps": train[-1]["step"] if train else cfg.get("meta", {}).get("step"),
        "tokens": train[-1].get("tokens") if train else None,
        "metrics": scalars,
        "per_layer": per_layer,
        "metrics_source": source,
        "last_training": train[-1] if train else None,
    }


def _front_matter(s: dict[str, Any], tag: str) -> str:
    lines = [
        "---",
        "library_name: torchtitan_clt",
        "tags:",
        "- interpretability",
        f"- {tag}",
        "- torchtitan_clt",
    ]
    model, _ = hub_model_id(s["config"].get("model_name") or "")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):  # a Hub model id (not a local path or gguf:)
        lines.append(f"base_model: {model}")
    return "\n".join([*lines, "---", ""])


def _skip_card(run: Path, repo_id: str, model_name: str) -> list[str]:
    """The circuit-tracer section of a CLT with a skip path: what a stock load loses (measured at
    export, ``circuit_tracer/conversion.json``) and the snippet that keeps it."""
    from torchtitan_clt.checkpoint.circuit_tracer import stock_load_of

    note = stock_load_of(_json(Path(run) / "circuit_tracer" / "conversion.json")) or {}
    if "fvu" in note:
        loss = (
            f"On {note['tokens']:,} tokens of {note['rows']} its FVU (mean over layers) is "
            f"{note['fvu']:.4f} without the skip path against {note['fvu_with_skip']:.4f} "
            "with it; the difference goes to the error nodes."
        )
    else:
        loss = "What it loses was not measured at export (`scripts/export.py` measures it)."
    return [
        "In circuit-tracer. **This CLT has a skip path** (`W_skip_{l}` in `W_enc_{l}.safetensors`), which "
        "circuit-tracer 0.5.0's stock `load_clt` (and so `ReplacementModel.from_pretrained`) does not "
        f"read: a stock load traces the features-only model. {loss} Load it with the skip path:",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from circuit_tracer import ReplacementModel",
        "from circuit_tracer.transcoder.cross_layer_transcoder import load_clt",
        "from torchtitan_clt.checkpoint.circuit_tracer import load_clt_skip",
        "",
        f'folder = snapshot_download("{repo_id}", allow_patterns="circuit_tracer/*") + "/circuit_tracer"',
        "clt = load_clt_skip(load_clt(folder, lazy_decoder=False), folder)",
        f'model = ReplacementModel.from_pretrained_and_transcoders("{model_name}", clt, backend="nnsight")',
        "```",
        "",
    ]


def render_model_card(
    run: str | Path, repo_id: str, files: list[str], header_comment: str | None = None
) -> str:
    """The README.md for ``run`` pushed as ``repo_id``; ``files``: the repo paths of the commit
    (the card describes the folders that are there)."""
    s = run_summary(run)
    cfg, a = s["config"], s["args"]
    family = cfg.get("family", a.get("family", "?"))
    long_name, tag = FAMILIES.get(family, (family, "transcoder"))
    layers = cfg.get("layers") or list(range(a.get("n_layers", 0)))
    act = cfg.get("activation", {})
    act_text = act.get("name", a.get("activation", "?")) + (
        f" (k = {act.get('k')})" if act.get("name") in ("topk", "batchtopk") else ""
    )
    has_ct = any(f.startswith("circuit_tracer/") for f in files)
    has_sl = any(f.startswith("saelens/") for f in files)
    out = [_front_matter(s, tag)]
    if header_comment:
        out.append(f"<!-- {header_comment} -->\n")
    out.append(f"# {repo_id.split('/')[-1]}: a {long_name} for {cfg.get('model_name') or 'an LLM'}\n")
    if s["description"]:
        out.append(f"{s['description']}.\n")
    out.append("Trained with torchtitan_clt.\n")
    tokens = f"{s['tokens']:,} tokens" if s["tokens"] else "tokens not recorded"
    rows = [
        ("family", f"`{family}` ({long_name})"),
        ("activation", act_text),
        ("LLM", f"`{cfg.get('model_name') or '?'}`"),
        ("layers", ", ".join(map(str, layers))),
        ("reads → writes", f"`{cfg.get('hook_in')}` → `{cfg.get('hook_out')}`"),
        (
            "features per layer",
            f"{a.get('features_per_layer', '?'):,}" if a.get("features_per_layer") else "?",
        ),
        ("d_in / d_out", f"{a.get('d_in', '?')} / {a.get('d_out', '?')}"),
        ("training", f"{s['steps']} steps, {tokens}"),
        ("weights", f"{cfg.get('dtype', '?')}, standardization folded (raw activations in and out)"),
    ]
    out += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    out.append("## Held-out evaluation\n")
    m = s["metrics"]
    if m:
        out.append(f"From {s['metrics_source']}; CE numbers replace every covered MLP output at once.\n")
        out += ["| metric | value |", "|---|---|"]
        out += [f"| {label} | {_fmt(fmt, m.get(key))} |" for key, label, fmt in METRICS if key in m]
        per = s["per_layer"]
        if per:
            out += ["", "| layer | " + " | ".join(per) + " |", "|---" * (len(per) + 1) + "|"]
            for i, layer in enumerate(layers):
                vals = [
                    _fmt("{:.4f}" if k == "fvu" else "{:.1f}", v[i] if i < len(v) else None)
                    for k, v in per.items()
                ]
                out.append(f"| {layer} | " + " | ".join(vals) + " |")
        out.append("")
    else:
        t = s["last_training"] or {}
        out.append(
            "This run has no held-out evaluation (train with `eval.enable = true`). On its last "
            f"training batches: FVU {_fmt('{:.4f}', t.get('fvu'))}, L0 {_fmt('{:.1f}', t.get('l0'))} "
            "(training data, not held out).\n"
        )
    order = list(PLOTS)
    plots = sorted(
        (f for f in files if f.startswith("report/") and f.endswith(".png")),
        key=lambda f: (order.index(Path(f).name) if Path(f).name in order else len(order), f),
    )
    if plots:
        out.append("## Plots\n")
        for p in plots:
            title = PLOTS.get(Path(p).name, Path(p).stem)
            out.append(f"**{title}**\n\n![{title}]({p})\n")
    out.append("## Files\n")
    out.append("- `config.json`, `model.safetensors`: the native export (`torchtitan_clt.load_pretrained`).")
    if has_ct:
        out.append(
            "- `circuit_tracer/`: the same dictionary in circuit-tracer's layout (`config.yaml` + safetensors)."
        )
    if has_sl:
        out.append(
            "- `saelens/layer_*/`: one SAELens folder per layer (`cfg.json` + `sae_weights.safetensors`)."
        )
    if any(f.startswith("report/") for f in files):
        out.append("- `report/`: the run's evaluation (`eval.json`) and plots.")
    if "training_config.toml" in files:
        out.append("- `training_config.toml`: the training configuration.")
    skip = bool(a.get("skip_connection"))
    out.append("\n## Load it\n")
    out += [
        "```python",
        "import torchtitan_clt",
        "",
        f'model = torchtitan_clt.load_pretrained("{repo_id}")  # "{repo_id}@<revision>" for a branch, tag or commit',
        f"acts = model.encode(x)     # x [N, {len(layers)}, {a.get('d_in', 'd_in')}] raw activations -> [N, {len(layers)}, {a.get('features_per_layer', 'F')}]",
        "y_hat = model.decode(acts, x)  # raw units" + ("; x adds the skip path" if skip else ""),
        "```",
        "",
    ]
    if has_ct:
        model_name, llm_note = hub_model_id(cfg.get("model_name") or "")
        clt_skip = skip and family != "plt"
        if not clt_skip:
            out += [
                "In circuit-tracer (its Hub loader reads the subfolder):",
                "",
                "```python",
                "from circuit_tracer import ReplacementModel",
                "",
                f'model = ReplacementModel.from_pretrained("{model_name}", "{repo_id}/circuit_tracer", backend="nnsight")',
                "```",
                "",
            ]
        else:
            out += _skip_card(run, repo_id, model_name)
        if llm_note:
            out += [llm_note, ""]
        out += [
            f'As a torchtitan_clt model: `torchtitan_clt.load_pretrained("hf://{repo_id}/circuit_tracer")`.',
            "",
        ]
    else:
        out.append(
            "No `circuit_tracer/` folder here: circuit-tracer loads CLTs and per-layer transcoders that "
            "read the MLP input, write its output and cover every LLM layer; for such a run, "
            "`scripts/export.py RUN --format circuit_tracer --out RUN` writes one before the push.\n"
        )
    if has_sl:
        layer = layers[0] if layers else 0
        loader = "SAE" if family == "sae" else "Transcoder"
        out += [
            "In SAELens:",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            f"from sae_lens import {loader}",
            "",
            f'path = snapshot_download("{repo_id}", allow_patterns="saelens/*")',
            f'sae = {loader}.load_from_disk(f"{{path}}/saelens/layer_{layer}")',
            "```",
            "",
        ]
    return "\n".join(out).rstrip() + "\n"
