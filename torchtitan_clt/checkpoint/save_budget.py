"""Will a checkpoint fit the preemption window? Its save time at a stated bandwidth vs the lead time.

SLURM signals the job ``lead_s`` seconds before it kills it (``--signal=B:USR1@lead_s``); the run
then finishes its step and saves (``tools/signals.py``). Every node writes its ranks' shards at
once, so the save takes ``bytes per node / bandwidth per node`` (the checkpoint storage's write
bandwidth as one node sees it: its NIC or its share of the file system, whichever is lower). What
is left of the window after the step in progress must cover it.

    save_time_line(state_bytes_per_rank=28.4e9, ranks_per_node=8, bandwidth_gbps=2.0, lead_s=120)

``scripts/estimate_memory.py`` prints it; ``metrics.jsonl``'s checkpoint rows give the measured
``save_s`` and ``write_gb_per_s`` to compare with.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class SaveBudget:
    state_bytes_per_rank: float
    """What one rank writes: its shard of the parameters and optimizer state (fp32 weights + AdamW
    m and v: 12 bytes per parameter), plus the small states."""

    ranks_per_node: int
    """Processes (GPUs) per node."""

    bandwidth_gbps: float
    """Write bandwidth of one node to the checkpoint storage, GB/s (10^9 bytes)."""

    lead_s: float
    """Seconds between the signal and the kill."""

    nodes: int = 1
    """Nodes of the job (for the totals only)."""

    step_s: float = 0.0
    """The step in progress when the signal lands: finished before the save starts."""

    @property
    def node_bytes(self) -> float:
        return self.state_bytes_per_rank * self.ranks_per_node

    @property
    def save_s(self) -> float:
        return self.node_bytes / (self.bandwidth_gbps * GB)

    @property
    def window_s(self) -> float:
        """What the window leaves for the save."""
        return self.lead_s - self.step_s

    @property
    def fits(self) -> bool:
        return self.save_s <= self.window_s

    @property
    def needed_gbps(self) -> float:
        """The bandwidth per node at which the save just fits (inf when nothing is left)."""
        return self.node_bytes / GB / self.window_s if self.window_s > 0 else float("inf")

    def line(self) -> str:
        total = self.node_bytes * self.nodes
        head = (
            f"checkpoint: {total / GB:,.1f} GB in all, {self.node_bytes / GB:,.1f} GB per node "
            f"({self.state_bytes_per_rank / GB:,.2f} GB per rank, also the async save's pinned "
            f"staging per rank); at {self.bandwidth_gbps:g} GB/s per node a save takes "
            f"{self.save_s:,.0f} s"
        )
        step = f" - a {self.step_s:g} s step" if self.step_s else ""
        if self.fits:
            return f"{head}: fits the signal's {self.lead_s:g} s lead{step} ({self.window_s - self.save_s:,.0f} s to spare)"
        lead = int(self.save_s * 1.25 + self.step_s) + 30
        return (
            f"{head}: does NOT fit the signal's {self.lead_s:g} s lead{step}. WARNING: a preemption's "
            f"stop save would be killed; it needs >= {self.needed_gbps:,.2f} GB/s per node "
            f"({self.needed_gbps * self.nodes:,.1f} GB/s over {self.nodes} nodes), or an earlier signal: "
            f"SIGNAL_LEAD_S={lead} sbatch --signal=B:USR1@{lead} scripts/slurm_train.sh ..."
        )


def save_time_line(
    state_bytes_per_rank: float,
    ranks_per_node: int,
    bandwidth_gbps: float,
    lead_s: float,
    nodes: int = 1,
    step_s: float = 0.0,
) -> str:
    """One line: the save's size and time at ``bandwidth_gbps`` per node against ``lead_s``, with a
    warning and what would fit when it does not."""
    return SaveBudget(state_bytes_per_rank, ranks_per_node, bandwidth_gbps, lead_s, nodes, step_s).line()
