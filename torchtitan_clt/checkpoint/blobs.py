"""The pickled states of a checkpoint (``states/<key>.pt``), beside the resharded DCP ones.

``split_states`` sends ``model``, ``optimizer`` and any state whose state_dict holds a DTensor to
DCP and keeps the others (data position, trainer step, lr scheduler, metrics, RNG) to be pickled
whole with ``torch.save``. ``write_blobs`` writes one file per state when every rank's bytes are
identical, else one per rank (``<key>.rank<R>.pt``); ``read_blobs`` reads them back for this world
size. The process-group helpers (one process has none) serve ``manager.py`` too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchtitan_clt.checkpoint.layout import STATES_DIR
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.tools.logging import logger

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

# Keys always saved through DCP (resharded on load); others go through DCP too if they hold DTensors.
DCP_KEYS = ("model", "optimizer")
# Per-rank states that may be dropped (with a warning) when resuming on a different world size.
RANK_LOCAL_OK = ("rng",)


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world() -> int:
    return dist.get_world_size() if dist_on() else 1


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    # DCP warns on every call without a process group; one process is a supported setup here.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def _has_dtensor(obj: Any) -> bool:
    if isinstance(obj, DTensor):  # type: ignore[arg-type]
        return True
    if isinstance(obj, dict):
        return any(_has_dtensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_dtensor(v) for v in obj)
    return False


def _to_cpu(obj: Any) -> Any:
    """Tensors to CPU (so the pickled bytes do not depend on the rank's device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def split_states(states: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(for DCP, to pickle)``: each state's current state_dict, by key."""
    dcp_sd, blobs = {}, {}
    for key, st in states.items():
        sd = st.state_dict()
        if key in DCP_KEYS or _has_dtensor(sd):
            dcp_sd[key] = sd
        else:
            blobs[key] = sd
    return dcp_sd, blobs


def write_blobs(tmp: Path, blobs: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """Write ``blobs`` under ``tmp/states/`` (the ranks compare digests over ``group``); returns
    the meta.json entries saying which keys were ``shared_keys`` and which ``per_rank_keys``."""
    (tmp / STATES_DIR).mkdir(exist_ok=True)  # every rank may need it; exist_ok: shared FS
    per_rank, shared = [], []
    for key, sd in blobs.items():
        buf = io.BytesIO()
        torch.save(_to_cpu(sd), buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        same = True
        if world() > 1:
            digests: list[str] = [""] * world()
            dist.all_gather_object(digests, digest, group=group)
            same = len(set(digests)) == 1
        if same:
            shared.append(key)
            if rank() == 0:
                (tmp / STATES_DIR / f"{key}.pt").write_bytes(data)
        else:
            per_rank.append(key)
            (tmp / STATES_DIR / f"{key}.rank{rank()}.pt").write_bytes(data)
    return {"shared_keys": shared, "per_rank_keys": per_rank}


def read_blobs(path: Path, meta: dict[str, Any], states: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """key -> ("one", state dict) or ("ranks", every old rank's copy), read from ``states/``."""

    def read(name: str) -> Any:
        return torch.load(
            io.BytesIO((path / STATES_DIR / name).read_bytes()), map_location="cpu", weights_only=False
        )

    same_world = meta["world_size"] == world()
    out: dict[str, tuple[str, Any]] = {}
    for key in states:
        if key in meta["shared_keys"]:
            out[key] = ("one", read(f"{key}.pt"))
        elif key in meta["per_rank_keys"]:
            if same_world:
                out[key] = ("one", read(f"{key}.rank{rank()}.pt"))
            elif hasattr(states[key], "load_state_dict_from_ranks"):
                # The state knows how to merge every old rank's copy (e.g. per-rank data
                # positions re-split over the new ranks).
                out[key] = ("ranks", [read(f"{key}.rank{r}.pt") for r in range(meta["world_size"])])
            else:
                msg = (
                    f"checkpoint state {key!r} differed between the {meta['world_size']} ranks "
                    f"that saved it, so it cannot resume on {world()} ranks"
                )
                if key not in RANK_LOCAL_OK:
                    raise ConfigError(msg + ": resume with the same number of ranks, or start fresh.")
                logger.warning("%s; keeping this process's current %s", msg, key)
    return out
