"""What a restarted worker knows about the restarts before it: how many, and why.

torchrun counts its restarts per node (``TORCHELASTIC_RESTART_COUNT``): the node whose worker
failed counts one, a node restarted only because the rendezvous changed counts none. The launcher
(``tools/launch.py``) writes each of its node's restarts with the failures that caused it to the
file named by ``TORCHTITAN_CLT_RESTART_LOG``. ``gather_restarts`` (every rank, once, after the
process group exists) merges every node's view; rank 0 logs it on the console and as one
``{"event": "restart", ...}`` row of ``metrics.jsonl`` (``metrics/logger.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

RESTART_LOG_ENV = "TORCHTITAN_CLT_RESTART_LOG"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"


@dataclass
class Restarts:
    """``count``: the most restarts any node made; ``causes``: what failed, per node, in order."""

    count: int = 0
    causes: list[str] = field(default_factory=list)

    def line(self) -> str:
        why = "; ".join(self.causes) or "another node's workers were restarted"
        return f"restart {self.count} of this job (after {why}): resuming from the last complete checkpoint"


def local_restarts() -> Restarts:
    """This node's restarts, from torchrun's environment and the launcher's log."""
    try:
        count = int(os.environ.get(RESTART_COUNT_ENV, "0") or 0)
    except ValueError:
        count = 0
    causes: list[str] = []
    path = os.environ.get(RESTART_LOG_ENV)
    if count > 0 and path and Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            causes += [f"restart {rec['restart']} on node {rec['node']}: {c}" for c in rec.get("causes", [])]
    return Restarts(count, causes)


def merge(views: list[Restarts]) -> Restarts:
    """One view from every rank's: the highest count, each cause once (ranks of a node repeat it)."""
    causes: list[str] = []
    for v in views:
        causes += [c for c in v.causes if c not in causes]
    return Restarts(max((v.count for v in views), default=0), causes)


_CURRENT = Restarts()


def set_current(r: Restarts) -> None:
    global _CURRENT
    _CURRENT = r


def current() -> Restarts:
    """The merged restarts of this job (count 0 on a first launch or without torchrun)."""
    return _CURRENT
