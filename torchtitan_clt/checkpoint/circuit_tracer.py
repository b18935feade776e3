"""circuit-tracer export and import (the folders its ``load_clt`` / ``load_transcoder_set`` read).

CLT folder: per source layer l, ``W_enc_{l}.safetensors`` holding ``W_enc_{l}  # [F, d]``,
``b_enc_{l}  # [F]``, ``b_dec_{l}  # [d]`` (the bias of target layer l) and, for JumpReLU,
``threshold_{l}  # [F]`` (θ itself, not log θ); ``W_dec_{l}.safetensors`` holding
``W_dec_{l}  # [F, L−l, d]``. PLT set: ``layer_{l}.safetensors`` with ``W_enc  # [F, d]``,
``W_dec  # [F, d]``, ``b_enc  # [F]``, ``b_dec  # [d]`` and ``activation_function.threshold  # [F]``.
A skip path (``model.skip_connection``) goes to ``W_skip_{l}  # [d, d]`` in the CLT's encoder files
(circuit-tracer's ``load_clt`` skips it: ``load_clt_skip`` attaches it) and ``W_skip  # [d, d]``
(x @ W_skip.T) in each PLT layer file, which ``load_transcoder_set`` reads.
Both carry ``config.yaml``: ``model_kind``, ``model_name``, ``feature_input_hook``,
``feature_output_hook`` (circuit-tracer's TransformerLens hook names).

circuit-tracer runs features as ReLU or JumpReLU on raw activations, over every layer of the LLM
from 0. So the export folds standardization into the weights, turns TopK / BatchTopK into JumpReLU
and refuses what it cannot represent; a model of a subset of the layers is written over all of
them, the others holding features that never fire (``circuit_tracer_layers``). The JumpReLU
comes from ``models.conversion.to_jumprelu`` on ``calibration`` batches (raw activations of the
run's text, a few thousand tokens; see ``checkpoint.calibration``): per-feature thresholds that
keep each layer's L0, fitted to the reconstruction for TopK. Its report (L0 and FVU per layer
before / after, on ``eval_batches``, else on the calibration batches) is logged and written to
``conversion.json`` in the folder.
Without batches it falls back to the per-layer threshold tracked in training, with a warning for
TopK (for BatchTopK that threshold *is* its inference mode).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from torchtitan_clt.checkpoint.circuit_tracer_layers import (
    clt_layers,
    coverage_note,
    llm_layer_count,
    plt_layers,
)
from torchtitan_clt.checkpoint.plain import folded_cpu_copy, is_rank0, unwrap
from torchtitan_clt.checkpoint.safetensors_stream import save_streamed
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.models.activations import BatchTopK, ReLU, TopK
from torchtitan_clt.models.conversion import side_by_side
from torchtitan_clt.protocols.model_spec import export_layout_of
from torchtitan_clt.protocols.registry import model_registry
from torchtitan_clt.protocols.transcoder import Transcoder, TranscoderArgs, dtype_name

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CONVERSION_FILE = "conversion.json"
CLT_KIND = "cross_layer_transcoder"
PLT_KIND = "transcoder_set"
# Our hook points -> circuit-tracer's (TransformerLens) names.
HOOK_NAMES = {
    "resid_mid": "hook_resid_mid",
    "mlp_in": "mlp.hook_in",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
# What circuit-tracer's replacement model can read features from / write them to.
INPUT_HOOKS = ("resid_mid", "mlp_in")
OUTPUT_HOOKS = ("mlp_out",)


# What a stock circuit-tracer user runs instead of ``load_clt`` to keep the skip path.
CALIBRATION_ROWS = "the calibration rows (training text)"
SKIP_FIX = (
    "from torchtitan_clt.checkpoint.circuit_tracer import load_clt_skip; "
    "clt = load_clt_skip(load_clt(folder), folder)"
)


@torch.no_grad()
def stock_load_loss(model: Transcoder, batches: Iterable, on: str) -> dict[str, Any]:
    """What circuit-tracer 0.5.0's stock ``load_clt`` loses on a CLT with a skip path: it reads
    no ``W_skip_{l}`` (only its Gemma-Scope-2 loader reads a skip), so ``ReplacementModel
    .from_pretrained`` and its CLI trace the features-only model. FVU per layer of the exported
    model (a plain fp32 copy, folded) with the skip path and without it, on raw ``(x, y)``
    ``batches`` (``on`` says which rows they are)."""
    sse = torch.zeros(2, model.args.n_layers, dtype=torch.float64)
    sum_y = sumsq = None
    n = 0
    for b in batches:
        x, y = b[0], b[1]
        a = model.encode(x)
        full, stock = model.decode(a, x).double(), model.decode(a, features_only=True).double()
        y = y.double()
        sse[0] += (y - full).pow(2).sum((0, 2))
        sse[1] += (y - stock).pow(2).sum((0, 2))
        sum_y = y.sum(0) if sum_y is None else sum_y + y.sum(0)
        sumsq = y.pow(2).sum((0, 2)) if sumsq is None else sumsq + y.pow(2).sum((0, 2))
        n += x.shape[0]
    if not n:
        return stock_load_keys(on, 0)
    fvu = (sse / (sumsq - sum_y.pow(2).sum(-1) / n).clamp_min(1e-30)).tolist()
    return stock_load_keys(on, n, fvu[0], fvu[1])


def stock_load_keys(
    on: str, tokens: int, with_skip: list[float] | None = None, stock: list[float] | None = None
) -> dict[str, Any]:
    """conversion.json's flat ``stock_load_*`` keys (``stock_load_of`` reads them back): the
    note, and the FVU per layer with the skip path and as a stock load gives it, when measured."""
    out: dict[str, Any] = {
        "stock_load_clt_reads_skip": False,
        "stock_load_fix": SKIP_FIX,
        "stock_load_rows": on,
        "stock_load_tokens": tokens,
    }
    if with_skip is not None and stock is not None:
        out.update(
            stock_load_fvu_with_skip=sum(with_skip) / len(with_skip),
            stock_load_fvu=sum(stock) / len(stock),
            stock_load_fvu_with_skip_per_layer=with_skip,
            stock_load_fvu_per_layer=stock,
        )
    return out


def stock_load_of(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``stock_load_*`` keys of a conversion report without their prefix (``fix``, ``rows``,
    ``tokens``, ``fvu_with_skip``, ``fvu``, ...); None when the export has no skip path."""
    if not report or "stock_load_fix" not in report:
        return None
    return {k[len("stock_load_") :]: v for k, v in report.items() if k.startswith("stock_load_")}


def describe_stock_load(loss: dict[str, Any]) -> str:
    """The console / model card sentence for ``stock_load_of(report)``."""
    if "fvu" in loss:
        what = (
            f"FVU {loss['fvu']:.4f} instead of {loss['fvu_with_skip']:.4f} "
            f"(mean over layers, {loss['tokens']} tokens of {loss['rows']})"
        )
    else:
        what = "its FVU was not measured here (no activation rows; scripts/export.py measures it)"
    return (
        "this CLT has a skip path (W_skip_{l} in W_enc_{l}.safetensors) that circuit-tracer 0.5.0's "
        "stock load_clt / ReplacementModel.from_pretrained do not read: a stock load traces the "
        f"features-only model, {what}; the rest goes to the error nodes. To trace the model this run "
        f"evaluated: {SKIP_FIX}, then ReplacementModel.from_pretrained_and_transcoders(model, clt)."
    )


class CircuitTracerExportError(ConfigError):
    """The model cannot be represented in circuit-tracer's format; the message says why (a
    ``ConfigError``: the trainer can check before training, see ``check_exportable``)."""


def check_exportable(
    model: torch.nn.Module, llm_n_layers: int | None = None, require_thresholds: bool = True
) -> str:
    """Return the circuit-tracer ``model_kind`` for ``model`` or raise CircuitTracerExportError.

    Call it with ``require_thresholds=False`` right after building the model (before training) to
    stop a run whose end-of-training export would fail; ``llm_n_layers`` (else
    ``args.extra["llm_n_layers"]``) lets it check that every LLM layer is covered."""
    model = unwrap(model)
    args: TranscoderArgs = model.args
    what = f"model.name={args.family!r}, activation={args.activation!r}"
    if args.hook_in == args.hook_out:
        raise CircuitTracerExportError(
            f"{what} reads and writes the same hook ({args.hook_in}): an SAE is not a transcoder, "
            "and circuit-tracer only loads transcoders (MLP input -> MLP output). Use the native "
            "export (load_pretrained) instead."
        )
    layout = export_layout_of(model)
    if layout is None:
        raise CircuitTracerExportError(
            f"{what}: circuit-tracer represents crosslayer transcoders and per-layer transcoder "
            f"sets only, and the family's ModelSpec declares no export_layout for a "
            f"{type(model).__name__}. Use the native export instead."
        )
    kind = CLT_KIND if layout.kind == "crosslayer" else PLT_KIND
    if args.hook_in not in INPUT_HOOKS or args.hook_out not in OUTPUT_HOOKS:
        raise CircuitTracerExportError(
            f"{what} maps {args.hook_in} -> {args.hook_out}; circuit-tracer's replacement model "
            f"reads features at {' or '.join(INPUT_HOOKS)} and writes them at {OUTPUT_HOOKS[0]}. "
            "Train with data.hook_in = 'resid_mid' (or 'mlp_in') and data.hook_out = 'mlp_out'."
        )
    # A subset of the LLM's layers is fine: the others get features that never fire
    # (checkpoint.circuit_tracer_layers); only the layer list itself must make sense.
    try:
        llm_layer_count(model, llm_n_layers, warn=False)
    except ValueError as e:
        raise CircuitTracerExportError(f"{what}: {e}") from e
    if args.d_in != args.d_out:
        raise CircuitTracerExportError(
            f"{what}: d_in {args.d_in} != d_out {args.d_out}; circuit-tracer uses one d_model for both."
        )
    act = model.activation
    if not hasattr(act, "feature_thresholds"):
        raise CircuitTracerExportError(
            f"{what}: activation {type(act).__name__} has no JumpReLU form (feature_thresholds); "
            "circuit-tracer loads ReLU and JumpReLU only."
        )
    updates = getattr(act, "threshold_updates", None)
    if require_thresholds and updates is not None and bool((updates == 0).any()):
        raise CircuitTracerExportError(
            f"{what}: the inference threshold of layer(s) {(updates == 0).nonzero().flatten().tolist()} "
            "was never estimated (it is tracked while training); train some steps before exporting."
        )
    return kind


def thresholds_for_export(model: Transcoder) -> torch.Tensor | None:
    """θ  # [L, F] of the JumpReLU that stands in for the model's activation; None for ReLU."""
    act = model.activation
    if isinstance(act, ReLU):
        return None
    _warn_if_approximate(act)
    return _checked(act.feature_thresholds().detach().float().cpu())


def _warn_if_approximate(act: torch.nn.Module) -> None:
    if isinstance(act, TopK) or not getattr(act, "jumprelu_equivalent", False):
        warnings.warn(
            f"{type(act).__name__} exported as JumpReLU with its tracked inference threshold: "
            "an approximation (the number of active features per token is no longer fixed).",
            stacklevel=4,
        )


def _checked(theta: torch.Tensor) -> torch.Tensor:
    if bool((theta < 0).any()):
        raise CircuitTracerExportError("negative JumpReLU thresholds cannot be exported.")
    return theta


class _StreamedThresholds:
    """θ of a sharded model, row j computed when ``clt_layers`` / ``plt_layers`` ask for it."""

    def __init__(self, stream: Any):
        self.stream = stream

    def __getitem__(self, j: int) -> torch.Tensor:
        return _checked(self.stream.feature_thresholds(j))


def _yaml_dump(config: dict[str, Any]) -> str:
    # JSON scalars are valid YAML; flat keys only, so no YAML library is needed to write it.
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items())


def read_config(folder: str | Path) -> dict[str, Any]:
    text = (Path(folder) / CONFIG_FILE).read_text()
    try:
        import yaml

        return yaml.safe_load(text) or {}
    except ImportError:
        out = {}
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#") and ":" in line:
                k, v = line.split(":", 1)
                v = v.strip()
                try:
                    out[k.strip()] = json.loads(v)
                except json.JSONDecodeError:
                    out[k.strip()] = v.strip("'\"")
        return out


def _rows_name(held_out: bool, report: dict[str, Any]) -> str:
    """What ``eval_on`` says; with native thresholds the export is the native model itself (the
    run's held-out evaluation, report/eval.json, is then the export's too)."""
    if report.get("thresholds") == "native":
        report["same_model_as_native_export"] = True
    if held_out:
        return "held-out text"
    return "calibration batches (training text, the rows the thresholds were fitted on)"


def _convert(
    copy: Transcoder, calibration: Iterable | None, eval_batches: Iterable | None, options: dict[str, Any]
) -> tuple[Transcoder, dict[str, Any] | None]:
    """TopK / BatchTopK -> JumpReLU for export (see the module docstring); others unchanged."""
    from torchtitan_clt.models.conversion import to_jumprelu

    if not isinstance(copy.activation, (TopK, BatchTopK)):
        return copy, None
    batches = list(calibration or [])
    if not batches:
        report = {
            "converted": False,
            "calibrated": False,
            "thresholds": "layer",
            "source_activation": copy.args.activation,
            "reason": "no calibration batches: the per-layer threshold tracked in training is exported",
        }
        return copy, report  # thresholds_for_export warns for TopK
    new, report = to_jumprelu(copy, batches, eval_batches=eval_batches, **options)
    report.pop("refine_history", None)
    report["eval_on"] = _rows_name(eval_batches is not None, report)
    report["calibration_tokens"] = sum(
        int(b[0].shape[0] if isinstance(b, (tuple, list)) else b.shape[0]) for b in batches
    )
    return new.eval(), report


def export_circuit_tracer(
    model: torch.nn.Module,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    llm_n_layers: int | None = None,
    calibration: Iterable | None = None,
    eval_batches: Iterable | None = None,
    conversion_options: dict[str, Any] | None = None,
) -> Path | None:
    """Write ``model`` as a circuit-tracer folder; returns it on rank 0 (None elsewhere; every rank
    must call it when the model is sharded). The model is left untouched.

    ``calibration`` / ``eval_batches``: raw ``(x, y)`` activation batches for the JumpReLU
    conversion of a TopK / BatchTopK model and for its before / after report (module docstring);
    ``conversion_options``: more ``to_jumprelu`` arguments (``thresholds``, ``refine_steps``, ...)."""
    calibration = list(calibration or [])
    kind = check_exportable(model, llm_n_layers, require_thresholds=not calibration)
    from torchtitan_clt.checkpoint.sharded_export import LayerStream, is_sharded, layer_plan

    act = unwrap(model).activation
    converts = bool(calibration) and isinstance(act, (TopK, BatchTopK))
    # BatchTopK's conversion with its defaults streams too (checkpoint.sharded_calibration);
    # TopK's (threshold fit, decoder refit) and any other options read the gathered copy.
    streams = not converts or (isinstance(act, BatchTopK) and eval_batches is None and not conversion_options)
    plan = layer_plan(model) if is_sharded(model) and streams else None
    if plan is not None:  # one source layer at a time, on every rank; rank 0 writes
        stream = LayerStream(model, plan)
        m = stream.model
        if converts:
            from torchtitan_clt.checkpoint.sharded_calibration import convert_batchtopk

            theta, report = convert_batchtopk(stream, calibration)
            stock = report.pop("_stock_fvu", None)
            report["eval_on"] = _rows_name(False, report)
            report["calibration_tokens"] = sum(int(b[0].shape[0]) for b in calibration)
            if stock is not None:  # rank 0: measured layer by layer on the calibration rows
                report.update(stock_load_keys(CALIBRATION_ROWS, report["eval_tokens"], *stock))
            theta = _checked(theta)
        else:
            _, report = _convert(m, [], None, {})  # no rows: nothing converted, says so (or None)
            theta = None
            if not isinstance(act, ReLU):
                _warn_if_approximate(act)
                theta = _StreamedThresholds(stream)
        if kind == CLT_KIND and m.args.skip_connection and stock_load_of(report) is None:
            report = {**(report or {}), **stock_load_keys(CALIBRATION_ROWS, 0)}  # no rows: not measured
        try:
            return _write_folder(
                folder, kind, m, stream.layer_tensors, theta, llm_n_layers, dtype, m.args.activation, report
            )
        finally:
            stream.release()
    copy = folded_cpu_copy(model)  # fp32, standardization folded, eval mode
    if not is_rank0():
        return None
    trained = copy.args.activation
    # Pre-activations do not change when folding, so neither do thresholds fitted on them.
    copy, report = _convert(copy, calibration, eval_batches, dict(conversion_options or {}))
    theta = thresholds_for_export(copy)
    if kind == CLT_KIND and getattr(copy, "W_skip", None) is not None:
        rows = eval_batches if eval_batches is not None else calibration
        on = "held-out text" if eval_batches is not None else CALIBRATION_ROWS
        report = {**(report or {}), **stock_load_loss(copy, list(rows or []), on)}
    tensors = export_layout_of(copy).layer_tensors
    return _write_folder(folder, kind, copy, tensors, theta, llm_n_layers, dtype, trained, report)


def _write_folder(
    folder: str | Path,
    kind: str,
    model: Transcoder,
    tensors: Any,
    theta: Any,
    llm_n_layers: int | None,
    dtype: torch.dtype,
    trained: str,
    report: dict[str, Any] | None,
) -> Path | None:
    """The layer files, config.yaml and conversion.json (rank 0 writes; every rank walks the
    layers in the same order, which for a sharded model's ``tensors`` are collective)."""
    write = is_rank0()
    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (
            list(folder.glob("W_enc_*.safetensors"))
            + list(folder.glob("W_dec_*.safetensors"))
            + list(folder.glob("layer_*.safetensors"))
        ):
            stale.unlink()  # a previous export with more layers must not leave files behind

    a = model.args
    n_llm = llm_layer_count(model, llm_n_layers, warn=write)
    if not write:  # a sharded model's other ranks: the same gathers as rank 0's, nothing written
        for j in range(a.n_layers):
            tensors(model, j)
        return None
    with torch.no_grad():
        if kind == CLT_KIND:
            for i, enc, dec in clt_layers(model, tensors, theta, n_llm, dtype):
                save_streamed(enc, folder / f"W_enc_{i}.safetensors", dtype)
                save_streamed(dec, folder / f"W_dec_{i}.safetensors", dtype)  # cast a chunk at a time
                del enc, dec  # nothing of this layer may outlive the next one's gather
        else:
            for i, sd in plt_layers(model, tensors, theta, n_llm, dtype):
                save_streamed(sd, folder / f"layer_{i}.safetensors", dtype)
                del sd
    config = {
        "model_kind": kind,
        "model_name": a.model_name,
        "feature_input_hook": HOOK_NAMES[a.hook_in],
        "feature_output_hook": HOOK_NAMES[a.hook_out],
        # Extra keys, ignored by circuit-tracer: where the folder came from.
        "exported_by": "torchtitan_clt",
        "trained_activation": trained,
        "dtype": dtype_name(dtype),
        **(coverage_note(model, n_llm) or {}),  # layers / uncovered_layers for a subset
    }
    if stock_load_of(report) is not None:
        config["skip_connection"] = True  # W_skip_{l}: read by load_clt_skip, not by load_clt
        config["stock_load_clt_reads_skip"] = False
        msg = describe_stock_load(stock_load_of(report))
        logger.warning("circuit-tracer export: %s", msg)
        warnings.warn(msg, stacklevel=3)
    (folder / CONFIG_FILE).write_text(_yaml_dump(config))
    stale = folder / CONVERSION_FILE
    if report is not None:
        stale.write_text(json.dumps(report, indent=2) + "\n")
        both = side_by_side(report)
        if both is not None:
            n, e = both
            logger.info(
                "circuit-tracer export vs native on %s (%s tokens): L0 %.2f vs %.2f, FVU %.4f vs %.4f, "
                "never-firing features %.1f%% vs %.1f%%",
                report.get("eval_on"),
                report.get("eval_tokens"),
                e["l0"],
                n["l0"],
                e["fvu"],
                n["fvu"],
                100 * e["never_fire"],
                100 * n["never_fire"],
            )
        if "l0_after_mean" in report:
            logger.info(
                "circuit-tracer export: %s -> JumpReLU (%s thresholds), on %s tokens: L0 %.2f -> %.2f, "
                "FVU %.4f -> %.4f (per layer in %s)",
                trained,
                report["thresholds"],
                report["eval_tokens"],
                report["l0_before_mean"],
                report["l0_after_mean"],
                report["fvu_before_mean"],
                report["fvu_after_mean"],
                stale,
            )
    elif stale.exists():
        stale.unlink()  # from an earlier export of another model
    return folder


# --- import --------------------------------------------------------------------------------------
def _layer_files(folder: Path, pattern: str) -> list[Path]:
    rx = re.compile(pattern)
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := rx.match(p.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise FileNotFoundError(
            f"{folder}: expected files {pattern} numbered 0..L-1, found layers {sorted(found)}."
        )
    return [found[i] for i in range(len(found))]


# Tensors whose first dimension is the feature (the rest are per layer: b_dec, W_skip).
_PER_FEATURE = re.compile(r"^(W_enc|b_enc|threshold|W_dec)(_\d+)?$|^activation_function\.threshold$")


def _read(path: Path, features: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A file's tensors; with ``features = (lo, hi)`` only those features' rows of the per-feature
    ones (read as slices: the rest of the file is not loaded)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        if features is None:
            return {k: f.get_tensor(k) for k in f.keys()}
        lo, hi = features
        return {k: f.get_slice(k)[lo:hi] if _PER_FEATURE.match(k) else f.get_tensor(k) for k in f.keys()}


def export_features_per_layer(folder: str | Path) -> int:
    """Features per layer of a circuit-tracer folder, from its first file's header."""
    folder = Path(folder)
    kind = read_config(folder).get("model_kind")
    path, key = (
        (folder / "W_enc_0.safetensors", "W_enc_0")
        if kind == CLT_KIND
        else (folder / "layer_0.safetensors", "W_enc")
    )
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return int(f.get_slice(key).get_shape()[0])


def load_circuit_tracer(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    features: tuple[int, int] | None = None,
) -> Transcoder:
    """A circuit-tracer CLT or PLT-set folder as our ``Transcoder`` (JumpReLU or ReLU), eval mode.
    ``features = (lo, hi)``: a dictionary of features ``lo..hi-1`` of every layer only (their
    activations are those of the whole dictionary: JumpReLU and ReLU act per feature), read from
    the files as slices; a rank's share of a sharded feature pass."""
    folder = Path(folder)
    config = read_config(folder)
    kind = config.get("model_kind")
    back = {v: k for k, v in HOOK_NAMES.items()}
    hooks = (
        config.get("feature_input_hook", "hook_resid_mid"),
        config.get("feature_output_hook", "hook_mlp_out"),
    )
    if any(h not in back for h in hooks):
        raise ValueError(
            f"{folder / CONFIG_FILE}: hooks {hooks} have no torchtitan_clt hook point "
            f"(known: {', '.join(back)})."
        )
    if kind == CLT_KIND:
        enc = [_read(p, features) for p in _layer_files(folder, r"^W_enc_(\d+)\.safetensors$")]
        L = len(enc)
        W_enc = torch.stack([enc[i][f"W_enc_{i}"] for i in range(L)])  # [L, F, d]
        b_enc = torch.stack([enc[i][f"b_enc_{i}"] for i in range(L)])
        b_dec = torch.stack([enc[i][f"b_dec_{i}"] for i in range(L)])
        theta = (
            torch.stack([enc[i][f"threshold_{i}"].reshape(-1) for i in range(L)])
            if "threshold_0" in enc[0]
            else None
        )
        W_dec = {
            f"W_dec.{i}": _read(folder / f"W_dec_{i}.safetensors", features)[f"W_dec_{i}"] for i in range(L)
        }
        W_skip = torch.stack([enc[i][f"W_skip_{i}"] for i in range(L)]) if "W_skip_0" in enc[0] else None
        family = "clt"
    elif kind == PLT_KIND:
        layers = [_read(p, features) for p in _layer_files(folder, r"^layer_(\d+)\.safetensors$")]
        L = len(layers)
        # Stored [d_out, d_in] (x @ W_skip.T); ours is [L, d_in, d_out].
        W_skip = torch.stack([s["W_skip"].T for s in layers]) if "W_skip" in layers[0] else None
        W_enc = torch.stack([s["W_enc"] for s in layers])
        b_enc = torch.stack([s["b_enc"] for s in layers])
        b_dec = torch.stack([s["b_dec"] for s in layers])
        key = "activation_function.threshold"
        theta = torch.stack([s[key].reshape(-1) for s in layers]) if key in layers[0] else None
        W_dec = {"W_dec": torch.stack([s["W_dec"] for s in layers])}
        family = "plt"
    else:
        raise ValueError(f"{folder / CONFIG_FILE}: model_kind {kind!r} is not {CLT_KIND!r} or {PLT_KIND!r}.")
    if theta is not None and bool((theta < 0).any()):
        raise ValueError(f"{folder}: negative JumpReLU thresholds cannot be represented (θ = exp(log θ)).")
    F, d = W_enc.shape[1], W_enc.shape[2]
    args = TranscoderArgs(
        family=family,
        n_layers=L,
        d_in=d,
        d_out=d,
        features_per_layer=F,
        activation="relu" if theta is None else "jumprelu",
        dtype=dtype_name(dtype or W_enc.dtype),
        model_name=str(config.get("model_name", "")),
        hook_in=back[hooks[0]],
        hook_out=back[hooks[1]],
        layers=list(range(L)),
        skip_connection=W_skip is not None,
    )
    with torch.device("meta"):
        model = model_registry.get(family).build_fn(args)
    model.to_empty(device=device)
    model.reset_standardization()
    sd = dict(model.state_dict())
    sd.update({"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, **W_dec})
    if W_skip is not None:
        sd["W_skip"] = W_skip.contiguous()
    if theta is not None:
        # θ = 0 gives log θ = -inf, whose exp is 0 again: JumpReLU(0) is ReLU, exactly.
        sd["activation.log_threshold"] = theta.float().log()
    model.load_state_dict(sd)
    return model.eval()


def load_clt_skip(clt: Any, folder: str | Path) -> Any:
    """Give circuit-tracer's ``CrossLayerTranscoder`` (from ``load_clt(folder)``) the skip path our
    export writes as ``W_skip_{l}`` in ``W_enc_{l}.safetensors``: circuit-tracer's class runs
    ``W_skip`` (reconstruction and attribution), but its ``load_clt`` does not read it (0.5.0).
    Returns ``clt``, unchanged when the folder has no skip path."""
    files = _layer_files(Path(folder), r"^W_enc_(\d+)\.safetensors$")
    blocks = []
    for i, path in enumerate(files):
        with safe_open(str(path), framework="pt") as f:  # this key only: load_clt read the rest
            if f"W_skip_{i}" not in f.keys():
                return clt
            blocks.append(f.get_tensor(f"W_skip_{i}"))
    ref = clt.b_dec
    W = torch.stack(blocks).to(ref.device, ref.dtype)
    clt.W_skip = torch.nn.Parameter(W, requires_grad=False)  # [L, d, d], as its x @ W_skip[l]
    clt.skip_connection = True
    return clt


def is_circuit_tracer_folder(path: str | Path) -> bool:
    p = Path(path)
    return (
        (p / CONFIG_FILE).is_file()
        and not (p / "config.json").is_file()
        and (any(p.glob("W_enc_*.safetensors")) or any(p.glob("layer_*.safetensors")))
    )
