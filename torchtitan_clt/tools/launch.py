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
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from torchtitan_clt.tools import exit_codes

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
# Codes whose worker already printed the reason (the rest get one line from here).
EXPLAINED = (
    exit_codes.USER_ERROR,
    exit_codes.TRAINING_ERROR,
    exit_codes.PREEMPTED,
    *(128 + s for s in FORWARDED),
)


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torchrun's agent would turn SIGTERM into a 30-second shutdown; it keeps the others.
    argv = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *argv]
    for sig in FORWARDED:
        signal.signal(sig, _forward)
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
    return exit_codes.OK


if __name__ == "__main__":
    code = main()
    if code == exit_codes.PREEMPTED:  # the workers saved and exited: no slow interpreter teardown
        from torchtitan_clt.tools.signals import exit_now

        exit_now(code)
    sys.exit(code)
