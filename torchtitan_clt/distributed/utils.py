"""Process-group setup from the launcher's environment, config agreement, small collectives.

``torchrun`` (``run_train.sh``) sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Without them (or with ``WORLD_SIZE=1``) the run is a single process and no
process group is created, so the trainer and every test also work without ``torchrun``.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from torchtitan_clt.config.manager import ConfigError, to_toml
from torchtitan_clt.distributed.parallel_dims import ParallelDims
from torchtitan_clt.tools import restarts, watchdog
from torchtitan_clt.tools.logging import logger


def env_world() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the launcher's environment (1, 0, 0 without one)."""

    def get(key: str, default: int) -> int:
        raw = os.environ.get(key, "")
        try:
            return int(raw) if raw else default
        except ValueError:
            raise ConfigError(f"environment variable {key}={raw!r} is not an integer.") from None

    return get("WORLD_SIZE", 1), get("RANK", 0), get("LOCAL_RANK", 0)


def device_type_for(job_config) -> str:
    """``cuda`` or ``cpu`` from ``training.device`` (``auto`` picks CUDA when present)."""
    want = job_config.training.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    return want


def init_distributed(job_config) -> ParallelDims:
    """Create the process group (if launched with several processes) and the device mesh.

    CUDA ranks use NCCL and bind ``cuda:LOCAL_RANK``; CPU ranks use gloo. The group's timeout is
    ``parallelism.init_timeout_s``; the training loop's is enforced by the watchdog
    (``tools/watchdog.py``, started here). A restarted
    worker learns here why it was restarted (``tools/restarts.py``). Returns the validated
    ``ParallelDims`` with its meshes built.
    """
    p = job_config.parallelism
    world, rank, local_rank = env_world()
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, world)
    device_type = device_type_for(job_config)
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {n} CUDA devices are visible; launch at most {n} "
                "processes per node (NGPU)."
            )
        torch.cuda.set_device(local_rank)
    if world == 1:
        restarts.set_current(restarts.local_restarts())
        return dims
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        init_s, _ = timeouts(p)
        dist.init_process_group(
            backend=backend, timeout=timedelta(seconds=init_s), rank=rank, world_size=world
        )
    _start_watchdog(job_config, rank, world)
    dims.build_mesh(device_type)
    logger.info(f"{dims} on {device_type} ({dist.get_backend()})")
    return dims


def timeouts(p) -> tuple[int, int]:
    """``(init, train)`` collective timeouts in seconds from the ``[parallelism]`` section; the
    deprecated ``timeout_s`` (when > 0) is both, as it used to be."""
    if p.timeout_s > 0:
        logger.warning(
            "parallelism.timeout_s is deprecated: it sets both parallelism.init_timeout_s and "
            f"parallelism.train_timeout_s (to {p.timeout_s} s); set those instead."
        )
        return p.timeout_s, p.timeout_s
    return p.init_timeout_s, p.train_timeout_s


def _start_watchdog(job_config, rank: int, world: int) -> None:
    """Agree on this launch's restart history and watchdog key prefix (one small all-gather over
    every rank), then start the watchdog (``tools/watchdog.py``)."""
    mine = restarts.local_restarts()
    views: list = [None] * world
    dist.all_gather_object(
        views, (mine, f"torchtitan_clt/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{time.time_ns()}")
    )
    restarts.set_current(restarts.merge([v[0] for v in views]))
    init_s, train_s = timeouts(job_config.parallelism)
    # NCCL's own timeout may drop to the training one in the loop, unless rank 0 evaluates inside
    # it while the others wait in a barrier.
    watchdog.set_timeouts(init_s, train_s, lower_nccl=job_config.eval.every <= 0)
    try:
        watchdog.start_watchdog(rank, world, train_s, prefix=views[0][1])
    except (RuntimeError, OSError, ValueError) as e:  # no store to beat to: train without it
        logger.warning(f"watchdog: not started ({e}); a hung rank is caught by the group's timeout only")


def config_digest(job_config) -> str:
    """A short hash of the resolved config (what ``config.toml`` holds)."""
    return hashlib.sha256(to_toml(job_config).encode()).hexdigest()[:16]


def check_config_consistent(job_config) -> None:
    """Stop every rank with a clear error when the ranks resolved different configs.

    Different configs (an edited file on one node, a different override) would otherwise train a
    silently wrong model or hang in a mismatched collective.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = config_digest(job_config)
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    ref = digests[0]
    differ = [r for r, d in enumerate(digests) if d != ref]
    if differ:
        raise ConfigError(
            f"ranks {differ} resolved a different config than rank 0 (digests {digests}); every node "
            "must launch with the same config file and overrides (check that the file is on a shared "
            "file system or identical on every node)."
        )


# ---- collectives for logging -------------------------------------------------------------------


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce(x: float | torch.Tensor, op, group) -> torch.Tensor:
    # float64 so that sums of many per-rank counts stay exact.
    t = torch.as_tensor(x).detach().to(torch.float64)
    if _is_dist():
        # NCCL needs a CUDA tensor; gloo a CPU one.
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        else:
            t = t.cpu()
        t = t.clone()
        dist.all_reduce(t, op=op, group=group)
    return t


def group_size(group=None) -> int:
    return dist.get_world_size(group) if _is_dist() else 1


def dist_sum(x: float | torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` (a number or a tensor, element-wise) over ``group`` (default: all ranks)."""
    return _reduce(x, dist.ReduceOp.SUM, group)


def dist_mean(x: float | torch.Tensor, group=None) -> torch.Tensor:
    """Mean of ``x`` over the ranks of ``group``."""
    return dist_sum(x, group) / group_size(group)


def dist_max(x: float | torch.Tensor, group=None) -> torch.Tensor:
    return _reduce(x, dist.ReduceOp.MAX, group)


def dist_min(x: float | torch.Tensor, group=None) -> torch.Tensor:
    return _reduce(x, dist.ReduceOp.MIN, group)


def barrier() -> None:
    if _is_dist():
        dist.barrier()


def destroy() -> None:
    """Tear down the process group (safe to call when there is none)."""
    watchdog.stop_watchdog()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients by their total norm; DTensor (FSDP / TP) gradients are reduced over their
    meshes so every rank sees the norm of the whole model. Returns the total norm (pre-clipping)."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=True)
    if hasattr(total, "full_tensor"):  # a DTensor (Partial over the shards): make it the global norm
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
