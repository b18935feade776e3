"""torchrun for ``run_train.sh``: the same arguments, without its traceback, forwarding preemption.

``python -m torchtitan_clt.tools.launch [torchrun options] -m torchtitan_clt.train ARGS``

- A worker that fails has already said why in one line (config / input error: exit 2, training
  error: 3, stopped by a signal: 75); torchrun would add a ``ChildFailedError`` traceback of ~30
  lines per launcher. Here the launcher exits with the worker's code and, only for codes the
  trainer does not explain itself, adds one line naming the rank and the code.
- SIGTERM and SIGUSR1 sent to the launcher (Kubernetes, a cloud's preemption notice, SLURM's
  ``--signal``, ``kill``) are forwarded to the workers, which finish their step, save and exit with
  75 (``tools/signals.py``). torchrun itself would stop the workers with SIGTERM and kill them 30 s
  later, whatever they were writing; SIGUSR1 would kill the launcher outright.
- ``--max-restarts N`` (``MAX_RESTARTS`` in ``run_train.sh``) restarts the workers of every node
  after a failure: a crash, a worker killed (OOM, ``kill -9``), a lost node, a hang the watchdog
  reported (exit 4). The workers resume from the last complete checkpoint. Exits whose restart
  would fail the same way or that were asked for (``exit_codes.NO_RESTART``: config / input error
  2, non-finite training 3, a signal-driven stop 75, a second signal 128+N) end the job at once.
  Each restart is announced on the console with its cause, and recorded in the file named by
  ``RESTART_LOG_ENV`` for the workers, which log it in ``metrics.jsonl`` (``tools/restarts.py``).

torchrun has no hook for either decision, so the agent's monitor and stop are wrapped here
(``_monitor_workers`` / ``_stop_workers``, unchanged in torch since 1.9); without them (a future
release renaming them) restarts still work, but a final exit is restarted too, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from torchtitan_clt.tools import exit_codes, restarts

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
# Codes whose worker already printed the reason (the rest get one line from here).
EXPLAINED = (
    exit_codes.USER_ERROR,
    exit_codes.TRAINING_ERROR,
    exit_codes.HUNG,
    exit_codes.PREEMPTED,
    *(128 + s for s in FORWARDED),
)
# A worker exiting with one of these ends the job on every node instead of restarting it.
FINAL = (*exit_codes.NO_RESTART, *(128 + s for s in FORWARDED))
RESTART_LOG_ENV = restarts.RESTART_LOG_ENV


def _children() -> list[int]:
    """Process ids of this process's children (the workers torchrun started), from /proc."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def _forward(signum: int, frame) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _exit_code(code: int) -> int:
    # A worker killed by signal N shows as -N; the shell convention is 128 + N.
    return 128 - code if code < 0 else code


def describe(exitcode: int, message: str = "") -> str:
    """One phrase for a worker's end: ``killed by SIGKILL``, ``hung (exit 4): ...``."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    what = {exit_codes.HUNG: "hung", exit_codes.BUG: "crashed"}.get(exitcode, "failed")
    # torchrun fills in a pointer to its docs when the worker wrote no error file.
    detail = "" if not message or message.startswith("To enable traceback") else f": {message}"
    detail = detail.split(" Exiting with code")[0]  # the watchdog's advice: the line says it already
    return f"{what} (exit {exitcode}){detail}"


def _stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP / SIGTSTP): it can take no signal but SIGKILL."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def install_restart_policy(log_path: Path) -> bool:
    """Wrap torchrun's agent: final exits end the job, restarts are announced and recorded, a
    stopped worker is killed at once (torchrun's SIGTERM would wait 30 s for it). Returns whether
    the agent could be wrapped."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent as Agent

    if not all(hasattr(Agent, a) for a in ("_monitor_workers", "_stop_workers")):
        logging.getLogger(__name__).warning(
            "torchtitan_clt: this torch's elastic agent has no _monitor_workers / _stop_workers; "
            "workers are restarted on every failure, config errors (exit 2) included."
        )
        return False
    monitor, stop = Agent._monitor_workers, Agent._stop_workers

    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.state not in (WorkerState.FAILED, WorkerState.UNHEALTHY) or not result.failures:
            return result
        failures = sorted(result.failures.items())
        final = [r for r, f in failures if _exit_code(f.exitcode) in FINAL]
        left = self._remaining_restarts
        if final or left <= 0:
            self._remaining_restarts = 0  # torchrun then stops the group and exits
            return result
        spec = worker_group.spec
        attempt = spec.max_restarts - left + 1
        causes = [f"rank {r} {describe(f.exitcode, f.message)}" for r, f in failures]
        node = worker_group.group_rank
        print(
            f"torchtitan_clt: node {node}: restart {attempt}/{spec.max_restarts} of the workers after "
            f"{'; '.join(causes)}; they resume from the last complete checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        record = {"restart": attempt, "node": node, "time": time.time(), "causes": causes}
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return result

    def _stop_workers(self, worker_group, *args, **kwargs):
        for pid in _children():
            if _stopped(pid):
                os.kill(pid, signal.SIGKILL)
        return stop(self, worker_group, *args, **kwargs)

    Agent._monitor_workers = _monitor_workers
    Agent._stop_workers = _stop_workers
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torchrun's agent would turn SIGTERM into a 30-second shutdown; it keeps the others.
    argv = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *argv]
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    # Where this node's restarts are recorded for its workers (they inherit the environment).
    # Each rendezvous round gets a fresh store for the workers (rank 0 hosts it). The agent's
    # shared store keeps a dead generation's keys: after a restart a fast rank read its peer's old
    # gloo address from it and failed to connect ("Connection refused"), restarting again.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log_dir = tempfile.mkdtemp(prefix="torchtitan_clt_")
    log_path = Path(log_dir) / "restarts.jsonl"
    os.environ[RESTART_LOG_ENV] = str(log_path)
    install_restart_policy(log_path)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs every worker's failure at ERROR (with a pointer to a traceback that the
    # worker did not have); its warnings (rendezvous, restarts) stay.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = _exit_code(failure.exitcode)
        if code not in EXPLAINED:
            where = f"; its error file: {failure.error_file}" if failure.error_file else ""
            print(
                f"torchtitan_clt: rank {rank} exited with code {code} (see its output above{where}).",
                file=sys.stderr,
            )
        return code
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return exit_codes.OK


if __name__ == "__main__":
    code = main()
    if code == exit_codes.PREEMPTED:  # the workers saved and exited: no slow interpreter teardown
        from torchtitan_clt.tools.signals import exit_now

        exit_now(code)
    sys.exit(code)
