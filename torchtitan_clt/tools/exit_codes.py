"""Exit codes of the trainer, the launcher and the scripts (README, "Exit codes").

0   done
1   a bug or an unexpected failure: the traceback says where
2   the config, a file the run reads (data, activation cache, checkpoint, export) or the disk: a
    one-line message names the field or the path and the fix; nothing was lost
3   training cannot go on (non-finite loss or activations): the message names the step and cause
4   a collective hung past ``parallelism.train_timeout_s`` (a rank stopped, froze or was lost): the
    message names the rank(s) that stopped answering and the collective waited in
    (``tools/watchdog.py``); the launcher restarts the job from its last complete checkpoint
75  stopped by SIGTERM / SIGUSR1 (preemption, SLURM's ``--signal``) after saving a checkpoint at
    the step it reached: relaunch the same command to resume (75 is sysexits' EX_TEMPFAIL)
128+N  a second signal N ended the run at once, without saving

The launcher (``tools/launch.py``) restarts the workers (up to ``MAX_RESTARTS`` times) on any other
failure (1, 4, a worker killed by a signal, a lost node); 2, 3, 75 and 128+N are final, because a
restart would fail the same way (2, 3) or the run was asked to stop (75, 128+N).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

OK = 0
BUG = 1
USER_ERROR = 2
TRAINING_ERROR = 3
HUNG = 4
PREEMPTED = 75
# Codes after which neither torchrun restarts the workers nor the SLURM script requeues the job
# (75 is requeued by the SLURM script, which owns the time limit, but never restarted in place).
NO_RESTART = (USER_ERROR, TRAINING_ERROR, PREEMPTED)


@contextlib.contextmanager
def user_errors(prog: str = "error") -> Iterator[None]:
    """For scripts: a ``ConfigError`` / ``InputError`` (or a missing file) becomes one line on
    stderr and exit code 2, not a traceback."""
    from torchtitan_clt.errors import ConfigError

    try:
        yield
    except (ConfigError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(USER_ERROR)
