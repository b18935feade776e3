"""Collectives the selection needs, kept in the kernel leaf: an exact distributed k-th largest
value (the BatchTopK / TopK threshold over ranks) that never gathers the dense pre-activations,
and a minimum over ranks. ``distributed/collectives.py`` re-exports them for the losses.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def world_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_min(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise minimum of ``x`` over ``group`` (no autograd); ``x`` itself without a group."""
    if world_size(group) == 1:
        return x
    x = x.detach().contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MIN, group=group)
    return x


class _SumReplicatedOut(torch.autograd.Function):
    """Forward: sum of the ranks' partial tensors. Backward: identity.

    Every rank of the group then computes the *same* loss from the summed tensor, so the gradient
    reaching the sum is already the full one on each rank; summing it again in backward (what
    ``torch.distributed.nn.all_reduce`` does) would scale it by the group size.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def sum_partials(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over ``group`` (forward), identity backward; no-op without a group."""
    if world_size(group) == 1:
        return x
    return _SumReplicatedOut.apply(x, group)


def _all_gather_cat(x: torch.Tensor, group) -> torch.Tensor:
    """[G, n] on each rank -> [G, world * n] (rank-major along dim 1)."""
    world = world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _top_values(x: torch.Tensor, m: int) -> torch.Tensor:
    """The m largest values of each row of ``x  # [G, n]``, padded with -inf when n < m."""
    n = x.shape[1]
    vals = x.topk(min(m, n), dim=1, sorted=False).values if n > 0 else x[:, :0]
    if vals.shape[1] < m:
        pad = vals.new_full((x.shape[0], m - vals.shape[1]), float("-inf"))
        vals = torch.cat([vals, pad], dim=1)
    return vals


@torch.no_grad()
def global_kth_largest(x: torch.Tensor, k: int, group) -> torch.Tensor:
    """The k-th largest value of each row over the ranks' shards of the row.

    ``x  # [G, n_local]``: row g of the global matrix is the concatenation of every rank's row g.
    Returns ``[G]`` (``-inf`` where a row has fewer than k values in total). Exact, with two small
    all-gathers instead of gathering the rows:
    1. each rank sends its top ceil(k / W) values; the k-th largest of that union is a lower bound
       ``lb`` of the answer (the union holds at least k values, all present globally);
    2. each rank sends only its values >= lb (padded to the largest such count); the answer is the
       k-th largest of those, since every value above it is >= lb.
    """
    G = x.shape[0]
    W = world_size(group)
    x = x.detach()
    if W == 1:
        if x.shape[1] < k:
            return x.new_full((G,), float("-inf"))
        return x.topk(k, dim=1, sorted=False).values.amin(dim=1)
    m = math.ceil(k / W)
    union = _all_gather_cat(_top_values(x, m), group)  # [G, W*m], W*m >= k
    lb = union.topk(k, dim=1, sorted=False).values.amin(dim=1)  # [G]
    # An -inf bound means fewer than k finite values exist: take all (the answer is -inf anyway).
    count = (x >= lb[:, None]).sum(dim=1).amax().reshape(1).to(torch.int64)
    counts = [torch.empty_like(count) for _ in range(W)]
    dist.all_gather(counts, count, group=group)
    cmax = int(torch.cat(counts).max().item())
    masked = torch.where(x >= lb[:, None], x, torch.full_like(x, float("-inf")))
    cand = _all_gather_cat(_top_values(masked, cmax), group)  # [G, W*cmax]
    if cand.shape[1] < k:
        return x.new_full((G,), float("-inf"))
    return cand.topk(k, dim=1, sorted=False).values.amin(dim=1)
