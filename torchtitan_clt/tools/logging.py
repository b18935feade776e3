"""The project's logger: one ``logging.Logger`` named ``torchtitan_clt``, rank-aware.

Only rank 0 prints INFO by default, so an 8-node run does not print everything 64 times; other
ranks print WARNING and above. ``TCLT_LOG_RANKS=all`` (or a comma list such as ``0,3``) makes the
named ranks print INFO too, and ``TCLT_LOG_LEVEL`` sets the level (``DEBUG``, ``INFO``, ...).
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("torchtitan_clt")

_FORMAT = "[%(asctime)s]%(rank)s %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def _env_rank() -> int:
    # Before init_process_group the launcher's env is the only source; torchrun sets RANK.
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _rank_prints_info(rank: int) -> bool:
    spec = os.environ.get("TCLT_LOG_RANKS", "0").strip().lower()
    if spec == "all":
        return True
    try:
        return rank in {int(r) for r in spec.split(",") if r.strip()}
    except ValueError:
        return rank == 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int):
        super().__init__()
        # The rank tag is only worth its width when several processes share one console.
        self.tag = f"[rank{rank}]" if world > 1 else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.tag
        return True


def init_logger(rank: int | None = None, level: str | int | None = None) -> logging.Logger:
    """Configure ``logger`` (idempotent): a time-stamped stream handler on stdout.

    ``rank`` defaults to the launcher's ``RANK``. Ranks that are not asked to print INFO (see the
    module docstring) log at WARNING.
    """
    rank = _env_rank() if rank is None else rank
    world = _env_world()
    if level is None:
        level = os.environ.get("TCLT_LOG_LEVEL", "INFO").upper()
    if isinstance(level, str):
        level = logging.getLevelName(level)
        if not isinstance(level, int):
            level = logging.INFO
    if not _rank_prints_info(rank):
        level = max(level, logging.WARNING)

    for h in list(logger.handlers):
        if getattr(h, "_tclt", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler._tclt = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATEFMT))
    handler.addFilter(_RankFilter(rank, world))
    logger.addHandler(handler)
    logger.setLevel(level)
    # Records still propagate to the root logger (pytest's caplog listens there); the root has
    # no handler unless the user added one, so nothing prints twice.
    return logger
