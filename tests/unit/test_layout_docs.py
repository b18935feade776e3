"""The layout's docs say what ``ParallelDims`` does: ``distributed/parallel_dims.py``'s docstring
and ``train_configs/clt_8b.toml``'s comments (tp = 32 spans 4 nodes of 8; dp_shard = -1 would
shard, replicas are dp_replicate), read and checked against the mesh's own rank arithmetic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from torchtitan_clt.distributed import parallel_dims
from torchtitan_clt.distributed.parallel_dims import ParallelDims

ROOT = Path(__file__).resolve().parents[2]
CLT_8B = ROOT / "train_configs" / "clt_8b.toml"


def _section_comment(text: str, section: str) -> str:
    """The comment lines right under ``[section]``."""
    lines = text.split(f"[{section}]\n", 1)[1].splitlines()
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        out.append(line.lstrip("# "))
    return " ".join(out)


def _tp_groups(d: ParallelDims) -> list[list[int]]:
    groups: dict = {}
    for rank in range(d.world_size):
        r, s, _ = d.coordinate(rank)
        groups.setdefault((r, s), []).append(rank)
    return list(groups.values())


def test_group_span_by_hand():
    # 16 ranks, 4 per node. tp = 8: groups 0-7, 8-15 -> 2 nodes each; dp_shard groups are 8 apart.
    d = ParallelDims(1, 2, 8, 16)
    assert _tp_groups(d) == [list(range(8)), list(range(8, 16))]
    assert d.group_span("tp", 4) == 2
    assert d.group_span("dp_shard", 4) == 2  # ranks r, r + 8: nodes r // 4 and r // 4 + 2
    assert ParallelDims(1, 4, 4, 16).group_span("tp", 4) == 1  # tp divides the node: inside it
    assert ParallelDims(1, 8, 2, 16).group_span("dp", 4) == 4
    with pytest.raises(ValueError):
        d.group_span("tp", 0)


def test_clt_8b_comments_match_the_mesh():
    text = CLT_8B.read_text()
    par = tomllib.loads(text)["parallelism"]
    launch = re.search(r"Launch on (\d+) nodes of (\d+)", text)
    assert launch, "clt_8b.toml no longer says how many nodes it launches on"
    nodes, per_node = map(int, launch.groups())
    note = _section_comment(text, "parallelism")
    claim = re.search(r"tp = (\d+) over (\d+) nodes of (\d+) GPUs: each tp group spans all (\d+) nodes", note)
    assert claim, f"[parallelism]'s comment does not state the tp span: {note!r}"
    tp, c_nodes, c_per, span = map(int, claim.groups())
    assert (tp, c_nodes, c_per, span) == (par["tp"], nodes, per_node, nodes)
    d = ParallelDims(par["dp_replicate"], par["dp_shard"], par["tp"], nodes * per_node)
    assert d.group_span("tp", per_node) == span == 4
    assert _tp_groups(d) == [list(range(32))] and "ranks 0-31" in note
    # "dp_shard stays 1 (-1 would shard with FSDP over any ranks past 32)"
    assert "dp_shard stays 1" in note and par["dp_shard"] == 1
    assert ParallelDims(1, -1, 32, 64).dp_shard == 2 and ParallelDims(1, -1, 32, 64).dp_shard_enabled
    # "more GPUs are replicas, dp_replicate = N / 32, each again 4 nodes"
    more = ParallelDims(64 // 32, 1, 32, 64)
    assert more.dp_replicate_enabled and not more.dp_shard_enabled
    assert more.group_span("tp", per_node) == 4 and more.group_span("dp_replicate", per_node) == 2
    assert "dp_replicate = N / 32" in note
    assert "timeout_s =" not in text.replace("init_timeout_s", "").replace("train_timeout_s", "")


def test_parallel_dims_docstring_is_true():
    doc = " ".join(parallel_dims.__doc__.split())
    assert "sits inside one node when ``tp`` divides the GPUs per node" in doc
    m = re.search(r"clt_8b: tp = (\d+) spans (\d+) nodes of (\d+)", doc)
    assert m
    tp, nodes, per_node = map(int, m.groups())
    assert ParallelDims(1, 1, tp, nodes * per_node).group_span("tp", per_node) == nodes
    assert ParallelDims(1, 8, 8, 64).group_span("tp", 8) == 1  # 8 divides 8: one node
    assert ParallelDims(1, -1, 8, 64).dp_shard == 8  # "-1 takes the ranks left over"
