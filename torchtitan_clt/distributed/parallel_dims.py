"""``ParallelDims``: the degrees of each parallelism and the device mesh built from them.

The world is laid out as a 3-D mesh ``[dp_replicate, dp_shard, tp]``, tp innermost: a tensor-
parallel group is ``tp`` consecutive ranks. It sits inside one node when ``tp`` divides the GPUs
per node, and spans ``tp / GPUs per node`` whole nodes when it is larger (clt_8b: tp = 32 spans 4
nodes of 8, so its per-step sum of ŷ crosses the network; ``group_span`` says it, and the mesh
logs it at start). A dp group's ranks are ``tp`` apart. ``dp_shard = -1`` takes the ranks left
over, which makes FSDP2 shard over them; data-parallel replicas without sharding are
``dp_replicate`` with ``dp_shard = 1``. Data loading and metric reduction need the flattened
data-parallel group ``dp = dp_replicate × dp_shard``; it is built as its own 2-D mesh
``[dp, tp]`` over the same rank order with the public ``DeviceMesh`` constructor, instead of the
private ``DeviceMesh._flatten``, so the code stays on stable APIs across PyTorch releases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.tools.logging import logger

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    _world_mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        r, s, t, w = self.dp_replicate, self.dp_shard, self.tp, self.world_size
        if w < 1:
            raise ConfigError(f"world size must be at least 1, got {w}.")
        for name, v in (("parallelism.dp_replicate", r), ("parallelism.tp", t)):
            if v < 1:
                raise ConfigError(f"{name} must be at least 1, got {v}.")
        if s == -1:
            if w % (r * t) != 0:
                raise ConfigError(
                    f"parallelism.dp_replicate ({r}) × parallelism.tp ({t}) = {r * t} does not divide "
                    f"the world size {w}; pick degrees whose product divides the number of processes."
                )
            s = self.dp_shard = w // (r * t)
        if s < 1:
            raise ConfigError(f"parallelism.dp_shard must be -1 (the rest) or at least 1, got {s}.")
        if r * s * t != w:
            raise ConfigError(
                f"parallelism.dp_replicate ({r}) × dp_shard ({s}) × tp ({t}) = {r * s * t}, but "
                f"{w} processes were launched; make the product equal the world size (NGPU × NNODES), "
                "or set parallelism.dp_shard = -1 to take the rest."
            )

    # ---- degrees -------------------------------------------------------------------------------
    @property
    def dp_degree(self) -> int:
        """Data-parallel degree: how many different batches each step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are wrapped by FSDP2 (sharded and/or replicated over dp)."""
        return self.dp_degree > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp_degree > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- ranks (from the global rank, valid before and after build_mesh) -----------------------
    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def coordinate(self, rank: int | None = None) -> tuple[int, int, int]:
        """``(dp_replicate, dp_shard, tp)`` coordinate of ``rank`` (default: this process)."""
        rank = self.rank if rank is None else rank
        t = rank % self.tp
        s = (rank // self.tp) % self.dp_shard
        r = rank // (self.tp * self.dp_shard)
        return r, s, t

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (0 .. dp_degree-1)."""
        r, s, _ = self.coordinate()
        return r * self.dp_shard + s

    @property
    def tp_rank(self) -> int:
        return self.coordinate()[2]

    def group_span(self, name: str, ranks_per_node: int) -> int:
        """How many nodes one group of mesh dimension ``name`` (``tp``, ``dp_shard``,
        ``dp_replicate``, ``dp``) spans, with ``ranks_per_node`` consecutive ranks per node."""
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be at least 1, got {ranks_per_node}.")
        pick = {
            "tp": lambda c: (c[0], c[1]),
            "dp_shard": lambda c: (c[0], c[2]),
            "dp_replicate": lambda c: (c[1], c[2]),
            "dp": lambda c: c[2],
        }[name]
        groups: dict = {}
        for rank in range(self.world_size):
            groups.setdefault(pick(self.coordinate(rank)), set()).add(rank // ranks_per_node)
        return max(len(nodes) for nodes in groups.values())

    # ---- meshes --------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Build the world mesh and the derived ``dp`` mesh; ``None`` in a single process.

        Every rank must call it (it creates process groups collectively).
        """
        if not self.distributed:
            return None
        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs an initialized process group (call init_distributed).")
        shape = (self.dp_replicate, self.dp_shard, self.tp)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)  # set by torchrun
        if self.tp_enabled and 0 < per_node < self.world_size and self.rank == 0:
            span = self.group_span("tp", per_node)
            if span > 1:
                logger.info(f"mesh: each tp group of {self.tp} spans {span} nodes of {per_node} ranks")
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        self._world_mesh = mesh
        self._meshes = {"world": mesh}
        for name in MESH_DIMS:
            self._meshes[name] = mesh[name]
        # FSDP2's mesh: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP. Slicing the world mesh
        # keeps its root, which FSDP2 needs to compose with the tp DTensors.
        self._meshes["fsdp"] = mesh["dp_replicate", "dp_shard"] if self.hsdp_enabled else mesh["dp_shard"]
        # The flattened dp group. When only one of dp_replicate / dp_shard exceeds 1 it *is* dp.
        if self.dp_replicate > 1 and self.dp_shard > 1:
            ranks = torch.arange(self.world_size).view(self.dp_degree, self.tp)
            self._meshes["dp"] = DeviceMesh(device_type, ranks, mesh_dim_names=("dp", "tp_of_dp"))["dp"]
        elif self.dp_replicate > 1:
            self._meshes["dp"] = mesh["dp_replicate"]
        else:
            self._meshes["dp"] = mesh["dp_shard"]
        return mesh

    @property
    def world_mesh(self) -> DeviceMesh | None:
        return self._world_mesh

    def _degree(self, name: str) -> int:
        degrees = {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
            "dp": self.dp_degree,
            "fsdp": self.dp_degree,
            "world": self.world_size,
        }
        if name not in degrees:
            raise KeyError(f"unknown mesh {name!r}; known: {', '.join(degrees)}")
        return degrees[name]

    def get_optional_mesh(self, name: str) -> DeviceMesh | None:
        """The mesh named ``name``, or ``None`` when that parallelism is off (degree 1)."""
        if self._degree(name) <= 1:
            return None
        if name not in self._meshes:
            raise RuntimeError(f"mesh {name!r} is enabled but build_mesh() has not been called.")
        return self._meshes[name]

    def get_mesh(self, name: str) -> DeviceMesh:
        mesh = self.get_optional_mesh(name)
        if mesh is None:
            raise RuntimeError(
                f"mesh {name!r} is not enabled (degree {self._degree(name)}); "
                "use get_optional_mesh when the parallelism may be off."
            )
        return mesh

    def get_group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of a 1-D mesh, or ``None`` when off (collectives then are no-ops)."""
        mesh = self.get_optional_mesh(name)
        return None if mesh is None else mesh.get_group()

    def __str__(self) -> str:
        return (
            f"ParallelDims(world={self.world_size}: dp_replicate={self.dp_replicate} × "
            f"dp_shard={self.dp_shard} × tp={self.tp})"
        )
