"""``CheckpointManager``: distributed checkpoints on ``torch.distributed.checkpoint`` (DCP).

Layout: ``<run>/<checkpoint.folder>/step-N/`` holding
- the DCP files (``.metadata``, ``__R_0.distcp``) of the *resharded* states: ``model`` and
  ``optimizer`` (and any state whose state_dict holds a DTensor), so a different mesh can load them;
- ``states/<key>.pt`` (written and read by ``blobs.py``): every other state (data position,
  trainer step, lr scheduler, metrics, RNG) pickled whole with ``torch.save``. Python objects of
  any shape survive, and a template is not needed to load them. If the ranks' copies are identical
  (the data position is global, counters are all-reduced) one file is written; if not, one per
  rank (``<key>.rank<R>.pt``), and such a state can only resume on the same number of ranks (RNG
  states excepted: a warning);
- ``meta.json``: step, world size, which keys went where, the model's ``TranscoderArgs``.

A checkpoint is complete only when fully written: everything goes into ``step-N.tmp/``, which rank
0 renames to ``step-N/`` after every rank finished (DCP's save ends with a gather, so rank 0's save
returning means all ranks' files are written). A ``.tmp`` left by a killed process is skipped with
a warning and removed by the next save. ``files.json`` (``integrity``) lists what was written; a
checkpoint that no longer matches it, or fails to load, is reported and the next older complete
one is loaded instead. A save that fails (a full disk) removes its ``.tmp`` and stops the run with
an ``InputError``; the checkpoints before it are untouched.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_clt.checkpoint import integrity
from torchtitan_clt.checkpoint.blobs import dist_on as _dist_on
from torchtitan_clt.checkpoint.blobs import quiet_dcp as _quiet_dcp
from torchtitan_clt.checkpoint.blobs import rank as _rank
from torchtitan_clt.checkpoint.blobs import read_blobs, split_states, write_blobs
from torchtitan_clt.checkpoint.blobs import world as _world
from torchtitan_clt.checkpoint.integrity import Damaged, reason
from torchtitan_clt.checkpoint.layout import META_FILE, TMP_DIR, checkpoint_path, list_checkpoints
from torchtitan_clt.checkpoint.stateful import ModelWrapper, OptimizerWrapper, RNGState  # noqa: F401
from torchtitan_clt.config.manager import ConfigError, InputError
from torchtitan_clt.metrics.logger import log_event
from torchtitan_clt.tools import restarts, watchdog
from torchtitan_clt.tools.logging import logger

# Older torch releases' async_save has no ``no_dist`` (it then infers it).
_ASYNC_HAS_NO_DIST = "no_dist" in inspect.signature(dcp.async_save).parameters


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _future_of(result: Any) -> Future:
    # torch >= 2.8 may return an AsyncSaveResponse wrapping the upload future.
    return getattr(result, "upload_completion", result)


def _pinned_stager() -> Any:
    """DCP's stager into pinned host memory, reused between saves; None where there is no CUDA
    (pinning needs it) or this torch has no ``DefaultStager`` (then DCP's own pageable copy)."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return None
    # Staging synchronously (the step waits for the device-to-host copy, which is fast) keeps the
    # optimizer from changing the weights under the copy; the write to disk stays in the background.
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=True,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=True,
        )
    )


_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$|\.rank(\d+)\.pt$")


def bytes_per_rank(path: Path, world: int) -> list[int]:
    """Bytes of a checkpoint folder by the rank that wrote them: DCP's ``__R_i.distcp`` and the
    per-rank ``states/<key>.rankR.pt``; the rest (metadata, shared states) rank 0's."""
    out = [0] * max(world, 1)
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        m = _RANK_FILE.search(f.name)
        r = int(m.group(1) or m.group(2)) if m else 0
        out[r if r < len(out) else 0] += f.stat().st_size
    return out


# --- the manager ---------------------------------------------------------------------------------
class CheckpointManager:
    """Saves and loads ``states`` (name -> Stateful) under ``<run_folder>/<checkpoint.folder>``.

    ``save(step)`` is called after every optimizer step; it writes at ``checkpoint.interval``, at
    ``training.steps`` and when forced. ``load()`` restores the latest complete checkpoint (or
    ``checkpoint.load_step``) and returns its step, or None when starting fresh. Every rank calls
    both, at the same steps (they are collectives)."""

    def __init__(
        self,
        run_folder: str | Path,
        job_config: Any,
        states: dict[str, Stateful],
    ):
        self.cfg = job_config.checkpoint
        self.last_step = int(job_config.training.steps)
        self.folder = Path(run_folder) / self.cfg.folder
        self.states = dict(states)
        self.enabled = bool(self.cfg.enable)
        for key, st in self.states.items():
            if not (hasattr(st, "state_dict") and hasattr(st, "load_state_dict")):
                raise TypeError(
                    f"checkpoint state {key!r} ({type(st).__name__}) is not Stateful: "
                    "give it state_dict() and load_state_dict()."
                )
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._last_saved: int | None = None
        self._stager = _pinned_stager() if self.enabled and self.cfg.async_mode == "async" else None
        self._save_t: dict[int, tuple[float, float]] = {}  # step -> (start, blocked seconds)
        self._saved_at: dict[int, float] = {}  # step -> when rank 0 committed it
        self._gloo = None
        if self.enabled and _dist_on():
            # A CPU group of our own: the background save's collectives never interleave with the
            # training ones on the default (maybe NCCL) group, and small objects need no GPU.
            self._gloo = dist.new_group(backend="gloo")

    # ---- save -----------------------------------------------------------------------------------
    def should_save(self, step: int, force: bool = False) -> bool:
        if not self.enabled or step == self._last_saved:
            return False
        interval = self.cfg.interval
        return force or step == self.last_step or (interval > 0 and step % interval == 0)

    def save(self, step: int, force: bool = False, last_step: bool = False) -> bool:
        """Write a checkpoint of ``step`` if it is due (interval, ``training.steps``, ``force`` or
        ``last_step``); returns whether it did. Call it after the step's state is final."""
        if not self.should_save(step, force or last_step):
            return False
        with watchdog.long_phase():  # waits on the file system: the long timeout, not the training one
            self.wait()  # one save in flight at a time
            t0 = time.perf_counter()
            tmp = self.folder / f"step-{step}.tmp"
            if _rank() == 0:
                self._remove_stale_tmp()
                tmp.mkdir(parents=True, exist_ok=False)
            _barrier()

            try:
                self._write(step, tmp, t0)
            except (OSError, CheckpointException) as e:
                self._abandon(step, tmp, e)
        self._last_saved = step
        return True

    def _write(self, step: int, tmp: Path, t0: float) -> None:
        dcp_sd, blobs = split_states(self.states)
        meta = write_blobs(tmp, blobs, self._gloo)
        meta.update(
            step=step,
            world_size=_world(),
            dcp_keys=sorted(dcp_sd),
            time=time.strftime("%Y-%m-%dT%H:%M:%S"),
            torch=torch.__version__,
            model_args=self._model_args(),
        )
        if _rank() == 0:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))

        if self.cfg.async_mode == "async":
            kwargs = {"no_dist": True} if not _dist_on() and _ASYNC_HAS_NO_DIST else {}
            if self._stager is not None:
                kwargs["async_stager"] = self._stager
            with _quiet_dcp():
                fut = _future_of(
                    dcp.async_save(dcp_sd, checkpoint_id=str(tmp), process_group=self._gloo, **kwargs)
                )
            if _rank() == 0:
                # Rank 0 commits from the writer thread; ``wait`` waits for the commit, not
                # just for the write.
                committed: Future = Future()
                fut.add_done_callback(lambda f, s=step: self._commit_if_ok(f, s, committed))
                fut = committed
            self._pending, self._pending_step = fut, step
            self._save_t[step] = (t0, time.perf_counter() - t0)
            logger.info(
                "checkpoint: step %d staged in %.2fs%s, writing in the background",
                step,
                time.perf_counter() - t0,
                " (pinned memory)" if self._stager is not None else "",
            )
        else:
            with _quiet_dcp():
                dcp.save(dcp_sd, checkpoint_id=str(tmp), no_dist=not _dist_on())
            if _rank() == 0:
                self._commit(step)
            _barrier()
            took = time.perf_counter() - t0
            logger.info(
                "checkpoint: saved step %d to %s in %.2fs", step, checkpoint_path(self.folder, step), took
            )
            self._log_save(step, t0, took)

    def _abandon(self, step: int, tmp: Path, err: BaseException) -> None:
        """A save failed (e.g. ENOSPC): remove its partial folder, keep every complete one, stop."""
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        done, _ = list_checkpoints(self.folder)
        keep = (
            f"the previous checkpoint (step {done[-1]}) is intact" if done else "no earlier checkpoint exists"
        )
        raise InputError(
            f"checkpoint: writing step {step} to {tmp} failed ({reason(err)}); the partial folder was "
            f"removed and {keep}. Free space on that disk (or lower checkpoint.keep_latest_k, or set "
            "checkpoint.folder elsewhere) and relaunch the same command to resume."
        ) from err

    def wait(self) -> None:
        """Block until the background save (if any) is written and committed."""
        if self._pending is None:
            return
        fut, step = self._pending, self._pending_step
        self._pending = self._pending_step = None
        with watchdog.long_phase():
            try:
                fut.result()  # re-raises a failed write
            except (OSError, CheckpointException) as e:
                self._abandon(step, self.folder / f"step-{step}.tmp", e)
            _barrier()
        logger.info("checkpoint: background save of step %d finished", step)
        t0, blocked = self._save_t.pop(step, (time.perf_counter(), 0.0))
        self._log_save(step, t0, blocked)

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()  # frees the pinned buffers
            self._stager = None

    def _log_save(self, step: int, t0: float, blocked_s: float) -> None:
        """Rank 0: the save's wall time and bytes per rank, to the console and ``metrics.jsonl``."""
        if _rank() != 0:
            return
        done = self._saved_at.pop(step, time.perf_counter())
        per_rank = bytes_per_rank(checkpoint_path(self.folder, step), _world())
        save_s = max(done - t0, blocked_s)
        record = {
            "save_s": round(save_s, 3),
            "blocked_s": round(blocked_s, 3),
            "async": self.cfg.async_mode == "async",
            "pinned": self._stager is not None,
            "bytes_per_rank_max": max(per_rank),
            "bytes_total": sum(per_rank),
            "write_gb_per_s": round(sum(per_rank) / max(save_s, 1e-9) / 1e9, 4),
        }
        if len(per_rank) <= 64:
            record["bytes_per_rank"] = per_rank
        log_event(step, "checkpoint", record)
        lead = self.cfg.signal_lead_s
        if lead > 0 and save_s > lead:
            logger.warning(
                "checkpoint: saving step %d took %.0f s, more than checkpoint.signal_lead_s = %g s: a "
                "preemption's stop save would be killed before it completes. Ask for the signal earlier "
                "(sbatch --signal=B:USR1@%d with SIGNAL_LEAD_S=%d) or write to faster storage.",
                step,
                save_s,
                lead,
                int(save_s * 1.5) + 30,
                int(save_s * 1.5) + 30,
            )

    def _model_args(self) -> dict[str, Any] | None:
        st = self.states.get("model")
        model = getattr(st, "model", None)
        model = getattr(model, "_orig_mod", model)
        args = getattr(model, "args", None)
        return args.to_dict() if hasattr(args, "to_dict") else None

    def _check_model_args(self, meta: dict[str, Any], path: Path) -> None:
        saved, now = meta.get("model_args"), self._model_args()
        if not saved or not now:
            return
        keys = ("family", "n_layers", "d_in", "d_out", "features_per_layer", "activation", "layers")
        diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
        if diff:
            raise ConfigError(
                f"checkpoint {path} holds a different model: "
                + ", ".join(f"{k} {a!r} (saved) vs {b!r} (this run)" for k, (a, b) in diff.items())
                + "; resume with the run's own config, or start fresh with --checkpoint.fresh_start=true."
            )

    def _commit_if_ok(self, fut: Future, step: int, committed: Future) -> None:
        try:
            if fut.exception() is not None:
                logger.error(
                    "checkpoint: background save of step %d failed: %s; it stays "
                    "incomplete and will be skipped",
                    step,
                    fut.exception(),
                )
                committed.set_exception(fut.exception())
                return
            self._commit(step)
            self._saved_at[step] = time.perf_counter()
            committed.set_result(step)
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()
            committed.set_exception(e)

    def _commit(self, step: int) -> None:
        """Rank 0, after every rank wrote: rename ``step-N.tmp`` to ``step-N``, then retention."""
        tmp, final = self.folder / f"step-{step}.tmp", checkpoint_path(self.folder, step)
        integrity.write_manifest(tmp)
        old = None
        if final.exists():  # the same step saved again (e.g. after --checkpoint.load_step)
            old = final.with_name(f"step-{step}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._retain()

    def _retain(self) -> None:
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        done, _ = list_checkpoints(self.folder)
        for step in done[: max(0, len(done) - max(k, 1))]:  # never the newest complete one
            shutil.rmtree(checkpoint_path(self.folder, step), ignore_errors=True)
            logger.info("checkpoint: removed step %d (keep_latest_k=%d)", step, k)

    def _remove_stale_tmp(self) -> None:
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if TMP_DIR.match(p.name) or p.name.endswith(".replaced"):
                logger.warning("checkpoint: removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------------
    def load(self, step: int = -1) -> int | None:
        """Restore every state from ``step`` (-1: ``checkpoint.load_step``, and if that is -1 the
        latest complete checkpoint). Returns the step loaded, or None when starting fresh."""
        if not self.enabled:
            return None
        with watchdog.long_phase():
            return self._load(step)

    def _load(self, step: int) -> int | None:
        done, partial = list_checkpoints(self.folder)
        restarted = restarts.current().count > 0
        if restarted and (self.cfg.fresh_start or step != -1 or self.cfg.load_step != -1):
            logger.warning(
                "checkpoint: this is a restart (%s); checkpoint.fresh_start / load_step apply to the first "
                "launch only: resuming from the latest complete checkpoint",
                restarts.current().line(),
            )
            step = -1
        elif step == -1:
            step = self.cfg.load_step
        if self.cfg.fresh_start and not restarted:
            if done and _rank() == 0:
                aside = self.folder.with_name(f"{self.folder.name}.before_fresh_start.{int(time.time())}")
                logger.warning(
                    "checkpoint.fresh_start: moving existing checkpoints %s aside to %s", self.folder, aside
                )
                self.folder.rename(aside)
            _barrier()
            return None
        for s in partial:
            logger.warning(
                "checkpoint: step %d in %s is incomplete (interrupted while saving); skipping it",
                s,
                self.folder,
            )
        if step == -1:
            if not done:
                logger.info("checkpoint: none found in %s, starting from step 0", self.folder)
                return None
            return self._load_latest_intact(done)
        elif step not in done:
            raise ConfigError(
                f"checkpoint.load_step={step}: no complete checkpoint of that step in {self.folder} "
                f"(complete: {done or 'none'}); pick one of them or -1 for the latest."
            )
        try:
            self._load_from(checkpoint_path(self.folder, step))
        except Damaged as e:
            raise InputError(
                f"checkpoint {checkpoint_path(self.folder, step)} (checkpoint.load_step={step}) is "
                f"damaged: {e}. Pick another step (complete: {done}) or -1 for the latest intact one."
            ) from e
        self._last_saved = step
        return step

    def _load_latest_intact(self, done: list[int]) -> int:
        """Load the newest complete checkpoint that is not damaged, saying which were skipped."""
        for i in range(len(done) - 1, -1, -1):
            path = checkpoint_path(self.folder, done[i])
            try:
                self._load_from(path)
            except Damaged as e:
                if i == 0:
                    raise InputError(
                        f"checkpoint {path} is damaged ({e}) and no older complete checkpoint is left in "
                        f"{self.folder}: restore it from a copy, or start over with --checkpoint.fresh_start=true "
                        "(which moves the folder aside)."
                    ) from e
                logger.warning(
                    "checkpoint: %s is damaged (%s); falling back to step %d. It is left in place for "
                    "inspection (a new save of step %d replaces it)",
                    path,
                    e,
                    done[i - 1],
                    done[i],
                )
                continue
            self._last_saved = done[i]
            return done[i]
        raise AssertionError("unreachable")  # pragma: no cover

    def _load_from(self, path: Path) -> None:
        t0 = time.perf_counter()
        problem = self._agree(integrity.check(path))
        if problem:
            raise Damaged(problem)
        meta = json.loads((path / META_FILE).read_text())
        dcp_keys = [k for k in self.states if k in meta["dcp_keys"]]
        missing = [
            k for k in self.states if k not in meta["dcp_keys"] + meta["shared_keys"] + meta["per_rank_keys"]
        ]
        if missing:
            raise ConfigError(
                f"checkpoint {path} has no state for {missing} (it holds {sorted(meta['dcp_keys'] + meta['shared_keys'] + meta['per_rank_keys'])}); "
                "it was written by a different setup: start fresh with --checkpoint.fresh_start=true."
            )
        self._check_model_args(meta, path)
        # Every pickled state is read before anything is loaded, so a damaged file leaves the
        # run's states as they were and the fallback loads an older checkpoint into clean ones.
        try:
            blobs, problem = read_blobs(path, meta, self.states), None
        except Exception as e:  # noqa: BLE001 - any unreadable file is damage
            blobs, problem = {}, f"a states/ file does not read ({reason(e)})"
        if problem := self._agree(problem):
            raise Damaged(problem)
        if dcp_keys:
            # dcp.load calls state_dict() of each Stateful for the template, loads into it in
            # place (resharding to the current mesh), then calls load_state_dict().
            try:
                with _quiet_dcp():
                    dcp.load(
                        {k: self.states[k] for k in dcp_keys}, checkpoint_id=str(path), no_dist=not _dist_on()
                    )
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank
                raise Damaged(f"the model / optimizer shards do not load ({reason(e)})") from e
        for key, (kind, sd) in blobs.items():
            if kind == "ranks":
                self.states[key].load_state_dict_from_ranks(sd)
            else:
                self.states[key].load_state_dict(sd)
        logger.info(
            "checkpoint: loaded step %d from %s in %.2fs (saved on %d ranks)",
            meta["step"],
            path,
            time.perf_counter() - t0,
            meta["world_size"],
        )

    def _agree(self, problem: str | None) -> str | None:
        """The first rank's problem, on every rank (all ranks fall back together)."""
        if _world() == 1:
            return problem
        problems: list[str | None] = [None] * _world()
        dist.all_gather_object(problems, problem, group=self._gloo)
        return next((p for p in problems if p), None)
