"""A window to kill a run mid-save: ``CheckpointManager._commit`` sleeps before it commits.

Imported in the process that saves: by the trainer through ``ARG`` (``--job.custom_import``, which
the trainer imports before it builds anything), or by a script with ``import slow_commit``. The
seconds come from the environment variable ``SLEEP_ENV``, read at every commit: ``"SECONDS"``
sleeps before every commit, ``"SECONDS@STEP"`` only before that step's. Then every file of the
step is written under ``step-N.tmp/`` but the checkpoint is not complete yet. Unset, nothing
changes (the test modules import it for ``SLEEP_ENV`` and ``ARG``, so pytest's process has it too).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from torchtitan_clt.checkpoint.manager import CheckpointManager
from torchtitan_clt.tools.logging import logger

SLEEP_ENV = "TCLT_CKPT_TEST_SLEEP_BEFORE_COMMIT"
ARG = f"--job.custom_import={Path(__file__).resolve()}"


def delay_for(step: int) -> float:
    spec = os.environ.get(SLEEP_ENV, "").split("@")
    return float(spec[0] or 0) if len(spec) == 1 or int(spec[1]) == step else 0.0


def _install() -> None:
    commit = CheckpointManager._commit
    if getattr(commit, "slow_commit", False):  # imported twice (by path and by name): patch once
        return

    def slow_commit(self: CheckpointManager, step: int) -> None:
        delay = delay_for(step)
        if delay > 0:
            logger.warning("checkpoint: %s=%s, sleeping before the commit", SLEEP_ENV, delay)
            time.sleep(delay)
        commit(self, step)

    slow_commit.slow_commit = True  # type: ignore[attr-defined]
    CheckpointManager._commit = slow_commit  # type: ignore[method-assign]


_install()
