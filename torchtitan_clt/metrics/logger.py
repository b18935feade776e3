"""Where metrics go: a console line, TensorBoard scalars (``tb/``), ``metrics.jsonl`` and, when
``metrics.wandb``, a Weights & Biases run (``wandb_sink.py``).

Only rank 0 writes; on other ranks ``log`` is a no-op. ``log(step, metrics)`` takes a dict:

    tokens         int, tokens seen so far (whole run, all ranks)
    loss           total loss
    terms          dict of loss terms (``recon``, ``sparsity``, ...) -> ``loss_<name>`` in the jsonl
    fvu_per_layer  [L] (tensor or list); ``fvu`` (their mean over finite layers) is derived
    l0_per_layer   [L]; ``l0`` derived likewise
    fvu, l0        scalars, when no per-layer values are given
    dead_frac      fraction of dead features
    lr             learning rate
    tokens_per_s, eta_s, peak_mem_gib   computed here when absent
    anything else  a scalar, written as is

Tensors may live on the GPU: they are moved to the host together, once per log.

Events that are not a training step (a restart, a checkpoint's save time and bytes) are rows
``{"step": N, "event": NAME, ...}``, written by ``log_event`` from anywhere in the process.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from torchtitan_clt.tools import restarts
from torchtitan_clt.tools.logging import logger
from torchtitan_clt.tools.utils import peak_memory_gib


def format_eta(seconds: float) -> str:
    """Seconds as ``h:mm:ss`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Throughput:
    """Tokens/s over the window since the last ``update``; ETA from the mean step time.

    The first window (compilation, allocator warm-up) is left out of the mean once a later
    window exists, so the ETA is not skewed by the slow start.
    """

    def __init__(self, total_steps: int, start_step: int = 0, start_tokens: int = 0):
        self.total_steps = total_steps
        self._t = time.perf_counter()
        self._step = start_step
        self._tokens = start_tokens
        self._windows: list[tuple[float, int]] = []  # (seconds, steps)

    def update(self, step: int, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        dt, dsteps, dtok = now - self._t, step - self._step, tokens - self._tokens
        self._t, self._step, self._tokens = now, step, tokens
        out = {"tokens_per_s": dtok / dt if dt > 0 else float("nan")}
        if dsteps > 0:
            self._windows.append((dt, dsteps))
        windows = self._windows[1:] if len(self._windows) > 1 else self._windows
        n = sum(w[1] for w in windows)
        step_time = sum(w[0] for w in windows) / n if n else float("nan")
        out["step_time_s"] = step_time
        out["eta_s"] = step_time * max(self.total_steps - step, 0)
        return out


def _to_host(metrics: dict[str, Any]) -> dict[str, Any]:
    """Every tensor to Python numbers / lists, with one device sync."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    out = {k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        keys = list(tensors)
        flat = [tensors[k].detach().float().reshape(-1) for k in keys]
        sizes = [f.numel() for f in flat]
        host = torch.cat([f.to(flat[0].device) for f in flat]).cpu().tolist()
        i = 0
        for k, n, t in zip(keys, sizes, (tensors[k] for k in keys)):
            out[k] = host[i] if t.dim() == 0 else host[i : i + n]
            i += n
    return out


def _finite_or_none(v: Any) -> Any:
    # Strict JSON has no NaN/Infinity; null keeps metrics.jsonl readable by every parser.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    return v


def _mean_finite(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


class MetricsLogger:
    """Console + TensorBoard + ``metrics.jsonl`` for one run folder (rank 0 only).

    ``start_step`` > 0 (a resume) drops the lines after it from an existing ``metrics.jsonl`` and
    appends; ``start_step`` 0 starts the file afresh. ``wandb_run_id``: the checkpointed WandB run
    (``wandb_sink.agree_run_id``) continued when ``metrics.wandb``.
    """

    def __init__(
        self,
        run_folder: str | Path,
        job_config,
        rank: int = 0,
        device: torch.device | str | None = None,
        start_step: int = 0,
        start_tokens: int = 0,
        wandb_run_id: str = "",
    ):
        self.cfg = job_config.metrics
        self.total_steps = job_config.training.steps
        self.rank = rank
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.enabled = rank == 0
        self.throughput = Throughput(self.total_steps, start_step, start_tokens)
        self.run_folder = Path(run_folder)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.run_folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.save_jsonl:
            path = self.run_folder / "metrics.jsonl"
            # A resumed run rewrites the steps after its checkpoint; drop the stale lines first.
            _truncate_jsonl_after(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")
        if self.cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(log_dir=str(self.run_folder / "tb"), flush_secs=30)
        if self.cfg.wandb:
            from torchtitan_clt.metrics.wandb_sink import WandbSink  # imports wandb: only when used

            self._wandb = WandbSink(self.run_folder, job_config, wandb_run_id)
        global _ACTIVE
        _ACTIVE = self
        if (r := restarts.current()).count > 0:  # merged over the ranks by init_distributed
            self.event(start_step, "restart", {"restarts": r.count, "causes": r.causes}, line=r.line())

    def event(self, step: int, name: str, fields: dict[str, Any], line: str | None = None) -> None:
        """One ``{"step", "event", ...}`` row in ``metrics.jsonl`` and a console line."""
        if not self.enabled:
            return
        logger.info(line or f"{name} at step {step}: " + ", ".join(f"{k} {v}" for k, v in fields.items()))
        if self._jsonl is not None:
            record = {"step": step, "event": name, **fields}
            self._jsonl.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            self._jsonl.flush()

    def reset_timer(self, step: int, tokens: int) -> None:
        """Start the throughput window now (call right before the first step, after setup)."""
        self.throughput = Throughput(self.total_steps, step, tokens)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """Write one logged step; returns the record written (None on other ranks)."""
        if not self.enabled:
            return None
        m = _to_host(dict(metrics))
        terms = m.pop("terms", None) or {}
        terms = _to_host(dict(terms))
        if "tokens" in m and "tokens_per_s" not in m:
            m.update(self.throughput.update(step, int(m["tokens"])))
        m.setdefault("peak_mem_gib", peak_memory_gib(self.device))
        per_layer = {k: m.pop(k) for k in ("fvu_per_layer", "l0_per_layer") if k in m}
        for k, v in per_layer.items():
            v = v if isinstance(v, list) else [v]
            m.setdefault(k.removesuffix("_per_layer"), _mean_finite(v))
            per_layer[k] = v

        record: dict[str, Any] = {"step": step}
        for k in ("tokens", "loss"):
            if k in m:
                record[k] = m.pop(k)
        record.update({f"loss_{k}": v for k, v in terms.items()})
        record.update(m)
        if self.cfg.per_layer:
            record.update(per_layer)

        logger.info(self._console_line(step, record, terms))
        if self._jsonl is not None:
            clean = {k: _finite_or_none(v) for k, v in record.items()}
            self._jsonl.write(json.dumps(clean) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._write_tb(step, record, terms)
        if self._wandb is not None:
            self._wandb.log(step, record, terms)
        return record

    def log_report(self, plan_files=None) -> None:
        """After the report and the exports are written: the plots (and, when asked, the files
        ``plan_files(run_folder, repo_id)`` lists, as an artifact) to WandB."""
        if self._wandb is not None:
            self._wandb.log_report(plan_files)

    def _console_line(self, step: int, r: dict[str, Any], terms: dict[str, Any]) -> str:
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        if "loss" in r:
            t = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
            parts.append(f"loss {r['loss']:.5g}" + (f" ({t})" if t else ""))
        if "fvu" in r:
            parts.append(f"fvu {r['fvu']:.4f}")
        if "l0" in r:
            parts.append(f"l0 {r['l0']:.1f}")
        if "dead_frac" in r:
            parts.append(f"dead {100 * r['dead_frac']:.1f}%")
        if "lr" in r:
            parts.append(f"lr {r['lr']:.2e}")
        if "tokens_per_s" in r:
            parts.append(f"{_si(r['tokens_per_s'])} tok/s")
        if "eta_s" in r:
            parts.append(f"eta {format_eta(r['eta_s'])}")
        parts.append(f"mem {r['peak_mem_gib']:.2f} GiB")
        return "  ".join(parts)

    def _write_tb(self, step: int, r: dict[str, Any], terms: dict[str, Any]) -> None:
        for k, v in r.items():
            if k == "step" or k.startswith("loss_"):
                continue
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self._tb.add_scalar(f"{k.removesuffix('_per_layer')}_layer/{i:02d}", x, step)
            elif isinstance(v, (int, float)):
                self._tb.add_scalar("loss/total" if k == "loss" else f"train/{k}", v, step)
        for k, v in terms.items():
            self._tb.add_scalar(f"loss/{k}", v, step)

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


_ACTIVE: MetricsLogger | None = None  # the run's logger on rank 0, for log_event


def log_event(step: int, name: str, fields: dict[str, Any]) -> None:
    """An event row in the run's ``metrics.jsonl`` (``MetricsLogger.event``); only a console line
    while no logger is open (before the trainer builds it, after it closes)."""
    if _ACTIVE is not None:
        _ACTIVE.event(step, name, fields)
    else:
        logger.info(f"{name} at step {step}: " + ", ".join(f"{k} {v}" for k, v in fields.items()))


def _si(x: float) -> str:
    if not math.isfinite(x):
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def _truncate_jsonl_after(path: Path, step: int) -> None:
    if step <= 0 or not path.exists():
        if step <= 0 and path.exists():
            path.unlink()  # a fresh start: the old run's lines would mix with this one's
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
