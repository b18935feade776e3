"""Torch fallbacks for the selection ops (TopK, BatchTopK threshold, compaction).

Sparse layout shared by every op: ``idx [N, G, K]`` (int64 feature ids, ``-1`` for padding) and
``vals [N, G, K]`` (0 at padding), one row per token and group (layer); K is the largest row count.
Within a row the ids ascend.
"""

from __future__ import annotations

import torch

from torchtitan_clt.kernels.layout_torch import one_thread

# Elements per topk call in ``top_values``: the CPU kernel copies its whole input as (value,
# int64 index) pairs, 16 B an element (2 GiB for one layer's calibration pre-activations at
# 4096 rows x 32768 features), so large inputs go through in chunks.
TOP_CHUNK = 1 << 24


def top_values(t: torch.Tensor, k: int, chunk: int = TOP_CHUNK) -> torch.Tensor:
    """``t.topk(min(k, n), dim=-1).values`` (descending) of ``t  # [..., n]``, taken over chunks of
    the last dimension with a running top: the same values, with a kernel workspace of
    ``(k + chunk) x rows`` elements instead of the whole input's."""
    n = t.shape[-1]
    top = None
    rows = t.numel() // n if n else 0
    step = max(chunk // max(1, rows), 1)
    for s in range(0, n, step):
        part = t[..., s : s + step]
        if top is not None:
            part = torch.cat([top, part], dim=-1)
        top = part.topk(min(k, part.shape[-1]), dim=-1).values
    return top if top is not None else t[..., :0]


# What the compaction keeps, given a threshold tau per group.
MODES = ("positive", "ge", "nonzero")


def topk_select(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``h [N, M]`` -> ``(vals [N, k], idx [N, k])``, the k largest per row (order unspecified).

    Ties at the k-th value go to the lowest ids, as in the Triton kernel and on every tp layout
    (``kernels.selection``): ``torch.topk`` alone picks among ties in no stated order. A second
    ``topk`` over an int32 score (entries above the k-th value first, then tied ones, lower id
    higher) takes exactly those k; no host sync."""
    m = h.shape[-1]
    if k == 0:
        return h[..., :0], torch.zeros((*h.shape[:-1], 0), dtype=torch.long, device=h.device)
    tau = torch.topk(h, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    ids_down = torch.arange(m, 0, -1, dtype=torch.int32, device=h.device)  # m - id: lower id higher
    score = torch.where(h > tau, m + 1, torch.where(h == tau, ids_down, 0))
    idx = torch.topk(score, k, dim=-1, sorted=False).indices  # >= k entries score above 0
    return h.gather(-1, idx), idx


def _tau_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _groups(t: torch.Tensor, scope: str) -> torch.Tensor:
    # [N, L, M] -> [L, N*M] (per layer) or [1, N*L*M] (all layers jointly)
    if scope == "layer":
        return t.transpose(0, 1).reshape(t.shape[1], -1)
    if scope == "all":
        return t.reshape(1, -1)
    raise ValueError(f"batchtopk scope {scope!r}: use 'layer' or 'all'")


def _threshold_with_candidates(h: torch.Tensor, k_total: int, scope: str, k_row: int):
    """``(tau [L], cand_vals, cand_idx [N, L, c])``: the exact k_total-th largest per group, found
    among each row's top-c candidates (one ``topk`` pass over h, parallel over rows, then a
    quickselect over N*c candidates). Exact when no row is cut off at or above tau (its smallest
    candidate is below tau): then every element >= tau is a candidate. Otherwise c grows (up to F,
    where it is trivially exact)."""
    n, n_layers, f = h.shape
    c = min(f, max(k_row, 1))
    while True:
        cand_v, cand_i = torch.topk(h, c, dim=-1, sorted=False)  # [N, L, c]
        groups = _groups(cand_v, scope)
        kk = min(k_total, groups.shape[1])
        tau = groups.kthvalue(groups.shape[1] - kk + 1, dim=1).values.to(_tau_dtype(h))
        tau = tau.expand(n_layers)
        exact = c == f or bool((cand_v.amin(-1) < tau.to(h.dtype)[None, :]).all())
        if exact:
            return tau.contiguous(), cand_v, cand_i
        c = min(f, 4 * c)


def _two_tier(h: torch.Tensor, k_total: int, scope: str, per_row: int):
    """Exact tau from small per-row candidate sets: top ``2*per_row+1`` of every row, then top
    ``8*per_row+1`` of only the rows whose small set lies entirely at or above the first tau (they
    may hide more). Returns ``(tau [L], tier1, tier2)`` or None when a row is still cut off (the
    caller then falls back). ``tier1 = (vals, ids [N, L, c1], saturated [N, L])``, ``tier2 =
    (rows [S, 2] (token, layer), vals, ids [S, c2])`` or None."""
    n, n_layers, f = h.shape
    c1, c2 = min(f, 2 * per_row + 1), min(f, 8 * per_row + 1)
    v1, i1 = torch.topk(h, c1, dim=-1, sorted=False)  # [N, L, c1]
    pool = _groups(v1, scope)
    if pool.shape[1] < k_total:
        return None
    tau = pool.kthvalue(pool.shape[1] - k_total + 1, dim=1).values.expand(n_layers)
    if c1 == f:  # every row whole: exact
        return tau.to(_tau_dtype(h)).contiguous(), (v1, i1, None), None
    sat = v1.amin(-1) >= tau[None, :]  # [N, L]: rows that may hold more than c1 entries >= tau
    if not bool(sat.any()):
        return tau.to(_tau_dtype(h)).contiguous(), (v1, i1, None), None
    rows = sat.nonzero()  # [S, 2]
    v2, i2 = torch.topk(h[rows[:, 0], rows[:, 1]], c2, dim=-1, sorted=False)  # [S, c2]
    v1m = v1.masked_fill(sat[..., None], float("-inf"))  # those rows now count through tier 2
    if scope == "all":
        pool = torch.cat([v1m.reshape(1, -1), v2.reshape(1, -1)], 1)
    else:
        lay = rows[:, 1]
        cnt = torch.bincount(lay, minlength=n_layers)
        order = torch.argsort(lay, stable=True)
        lo = lay[order]
        pos = torch.arange(lo.numel(), device=h.device) - (cnt.cumsum(0) - cnt)[lo]
        pad = torch.full((n_layers, int(cnt.max()), c2), float("-inf"), dtype=h.dtype, device=h.device)
        pad[lo, pos] = v2[order]
        pool = torch.cat([_groups(v1m, "layer"), pad.reshape(n_layers, -1)], 1)
    tau = pool.kthvalue(pool.shape[1] - k_total + 1, dim=1).values.expand(n_layers)  # -inf pads rank lowest
    ok = bool((v1.amin(-1)[~sat] < tau[None, :].expand(n, n_layers)[~sat]).all())
    ok = ok and (c2 == f or bool((v2.amin(-1) < tau[rows[:, 1]]).all()))
    if not ok:
        return None
    return tau.to(_tau_dtype(h)).contiguous(), (v1, i1, sat), (rows, v2, i2)


def _block_width(n_elems: int, kk: int) -> int:
    """Block width for ``_block_select``: a power of two dividing ``n_elems``, near
    sqrt(n_elems / kk), which balances the block maxima (n_elems / b) against the candidates
    (kk * b). 1 when blocks would not pay (fewer than ~4 elements per kept one)."""
    b = 1
    while (2 * b) ** 2 * kk <= n_elems and n_elems % (2 * b) == 0:
        b *= 2
    return b


def _block_select(h: torch.Tensor, k_total: int, scope: str, positive: bool | None):
    """Exact BatchTopK from block maxima: view each group's values (a layer's [N, F], or all
    layers) as blocks of b; the kk-th largest block maximum ``lo`` is <= tau (kk distinct elements
    reach it), and every element >= tau lies in a block whose maximum is >= lo. So one max pass over
    h, a quickselect over the maxima and one over the ~kk*b candidates give tau exactly; the kept
    entries come out of the candidates already sorted by (layer, token, feature).

    Returns ``(tau [L], idx [N, L, K])`` (idx None when ``positive`` is None: threshold only), or None
    when blocks do not pay (tiny groups) and the caller uses the per-row candidates instead."""
    n, n_layers, f = h.shape
    hl = h.permute(1, 0, 2)  # [L, N, F]: the encoder's bmm output is stored this way
    if not hl.is_contiguous():
        hl = hl.contiguous()
    g = n_layers if scope == "layer" else 1
    hg = hl.reshape(g, -1)  # [G, M]
    m = hg.shape[1]
    kk = min(k_total, m)
    b = _block_width(m, kk)
    if b < 2:
        return None
    nb = m // b
    blocks = hg.view(g, nb, b)
    bmax = blocks.amax(-1)  # [G, nb]
    # the rest reads ~1/b of h: one thread (see layout_torch.one_thread)
    with one_thread(h.device):
        lo = bmax.kthvalue(nb - min(kk, nb) + 1, dim=1, keepdim=True).values  # [G, 1], <= tau
        cand = (bmax >= lo).nonzero()  # [C, 2] (group, block), ascending
        gi, bi = cand[:, 0], cand[:, 1]
        cv = blocks[gi, bi]  # [C, b]
        cnt = torch.bincount(gi, minlength=g)
        cmax = int(cnt.max())
        if cnt.numel() == 1 or bool((cnt == cmax).all()):
            pool = cv.view(g, -1)
        else:  # ties at lo: groups hold different numbers of candidate blocks; pad with -inf
            pos = torch.arange(gi.numel(), device=h.device) - (cnt.cumsum(0) - cnt)[gi]
            pool = torch.full((g, cmax, b), float("-inf"), dtype=h.dtype, device=h.device)
            pool[gi, pos] = cv
            pool = pool.view(g, -1)
        tau = pool.kthvalue(pool.shape[1] - kk + 1, dim=1).values  # [G]; -inf pads rank lowest
        tau_l = tau.to(_tau_dtype(h)).expand(n_layers).contiguous()
        if positive is None:
            return tau_l, None
        keep = cv >= tau[gi][:, None]
        if positive:
            keep &= cv > 0
        q = torch.masked_select(
            (gi * m + bi * b)[:, None] + torch.arange(b, device=h.device), keep
        )  # flat positions in hl, ascending: sorted by (layer, token, feature)
        row, feat = q // f, q % f  # row = layer * N + token
        counts = torch.bincount(row, minlength=n_layers * n)
        width = int(counts.max()) if counts.numel() else 0
        slot = torch.arange(row.numel(), device=h.device) - (counts.cumsum(0) - counts)[row]
        out = torch.full((n_layers * n * width,), -1, dtype=torch.long, device=h.device)
        out.scatter_(0, row * width + slot, feat)
        return tau_l, out.view(n_layers, n, width).permute(1, 0, 2)


def batchtopk_threshold(h: torch.Tensor, k_total: int, scope: str = "layer", k_row: int = 0) -> torch.Tensor:
    """``h [N, L, F]`` -> ``tau [L]`` (fp32; fp64 for fp64 input): the k_total-th largest value per
    layer (``layer``) or over all layers jointly (``all``, the same value repeated). Selection
    (block maxima or per-row topk candidates, then quickselect), never a full sort. ``k_row``: first guess of how many
    entries one row can hold (default 4x the mean)."""
    n, n_layers, f = h.shape
    _groups(h[:0], scope)  # validates scope
    if k_total <= 0 or h.numel() == 0:
        return torch.full((n_layers,), float("inf"), dtype=_tau_dtype(h), device=h.device)
    per_row = k_total // (n * (n_layers if scope == "all" else 1)) + 1
    if not k_row:
        found = _block_select(h, int(k_total), scope, None)
        if found is not None:
            return found[0]
        found = _two_tier(h, int(k_total), scope, per_row)
        if found is not None:
            return found[0]
    return _threshold_with_candidates(h, int(k_total), scope, k_row or 4 * per_row)[0]


def _kept_ids(vals, ids, tau_rows, positive: bool, f: int):
    keep = vals >= tau_rows
    if positive:
        keep &= vals > 0
    return torch.where(keep, ids, f), keep.sum(-1)


def batchtopk_select(h: torch.Tensor, k_total: int, scope: str = "layer", positive: bool = True):
    """``h [N, L, F]`` -> ``(idx [N, L, K], tau [L])``: BatchTopK, the ``k_total`` largest per layer
    (``layer``) or over all layers (``all``), ties at tau all kept, ``positive`` drops entries <= 0.
    The compaction works on the candidates only (no second pass over h).
    ids are stored layer-major (``[L, N, K]``, returned as an ``[N, L, K]`` view) so the per-layer
    entry lists downstream are contiguous slices."""
    n, n_layers, f = h.shape
    if k_total <= 0 or h.numel() == 0:
        tau = batchtopk_threshold(h, 0, scope)
        return torch.full((n, n_layers, 0), -1, dtype=torch.long, device=h.device), tau
    k_total = min(int(k_total), h.numel() // (1 if scope == "all" else n_layers))
    k = k_total // (n * (n_layers if scope == "all" else 1)) + 1  # mean kept per row, rounded up
    found = _block_select(h, k_total, scope, positive)
    if found is not None:
        return found[1], found[0]
    found = _two_tier(h, k_total, scope, k)
    if found is None:
        tau, cand_v, cand_i = _threshold_with_candidates(h, k_total, scope, 4 * k + 1)
        found = (tau, (cand_v, cand_i, None), None)
    tau, (v1, i1, sat), tier2 = found
    th = tau.to(h.dtype)
    ids1, cnt1 = _kept_ids(v1, i1, th[None, :, None], positive, f)
    if sat is not None:
        ids1 = ids1.masked_fill(sat[..., None], f)
        cnt1 = cnt1.masked_fill(sat, 0)
    width = int(cnt1.max())
    if tier2 is not None:
        rows, v2, i2 = tier2
        ids2, cnt2 = _kept_ids(v2, i2, th[rows[:, 1]][:, None], positive, f)
        width = max(width, int(cnt2.max()))
    out = torch.full((n_layers, n, width), f, dtype=torch.long, device=h.device)
    w1 = min(width, ids1.shape[-1])
    out[..., :w1] = ids1.permute(1, 0, 2).sort(-1).values[..., :w1]  # kept ids ascending, f's after
    if tier2 is not None:
        out[rows[:, 1], rows[:, 0]] = ids2.sort(-1).values[:, :width]
    return out.masked_fill_(out == f, -1).permute(1, 0, 2), tau


def _keep_mask(h: torch.Tensor, tau: torch.Tensor, mode: str) -> torch.Tensor:
    # h [N, G, M], tau [G]
    if mode == "nonzero":
        return h != 0
    keep = h >= tau.to(h.dtype)[None, :, None]
    if mode == "positive":
        keep &= h > 0
    elif mode != "ge":
        raise ValueError(f"compaction mode {mode!r}: use one of {MODES}")
    return keep


def compact(h: torch.Tensor, tau: torch.Tensor, mode: str = "positive") -> torch.Tensor:
    """``h [N, G, M]``, ``tau [G]`` -> ``idx [N, G, K]`` of the kept entries, -1 padded."""
    n, g, m = h.shape
    keep = _keep_mask(h, tau, mode)
    counts = keep.sum(-1).reshape(-1)  # [N*G]
    width = int(counts.max()) if counts.numel() else 0
    out = torch.full((n * g, width), -1, dtype=torch.long, device=h.device)
    if width == 0:
        return out.view(n, g, 0)
    nz = keep.reshape(n * g, m).nonzero()  # [nnz, 2] row-major: (row, feature), rows ascending
    rows, feats = nz[:, 0], nz[:, 1]
    starts = counts.cumsum(0) - counts
    pos = torch.arange(rows.numel(), device=h.device) - starts[rows]
    out[rows, pos] = feats
    return out.view(n, g, width)
