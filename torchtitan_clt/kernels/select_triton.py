"""Triton selection: radix select of the k-th largest value, and compaction to the sparse layout.

Radix select works on fp32 bits mapped to order-preserving int32 keys. Four passes (8 bits each,
top digit first) each build a 256-bin histogram of the elements whose higher digits match the
prefix chosen so far; a few tiny torch ops pick the digit holding the k-th largest. No sort, no
host sync, 4 reads of the input. Partial histograms go to a [G, P, 512] buffer (no atomics, so the
result is deterministic); bins 256..511 only absorb excluded elements.

A tensor is seen as ``[A, G, M]`` with any strides; group g (a layer, or a token row for TopK) owns
the A*M elements ``h[:, g, :]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchtitan_clt.kernels import launch

_BLOCK = 1024
_TARGET_PROGRAMS = 1024


@triton.jit
def _order_key(x):
    # fp32 -> int32 whose signed order is the float order (negative floats: flip the low 31 bits)
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _radix_hist_kernel(
    h_ptr,
    part_ptr,
    prefix_ptr,
    A,
    M,
    rows_per_prog,
    s_a,
    s_g,
    s_m,
    SHIFT: tl.constexpr,
    IS_TOP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    p = tl.program_id(1)
    n_prog = tl.num_programs(1)
    prefix = tl.load(prefix_ptr + g)
    hist = tl.zeros([512], dtype=tl.int32)
    base = h_ptr + g.to(tl.int64) * s_g
    a0 = p * rows_per_prog
    for i in range(0, rows_per_prog):
        a = a0 + i  # a tensor (program_id-derived), so the int64 cast below is legal
        row = base + a.to(tl.int64) * s_a
        m_lim = tl.where(a < A, M, 0)  # rows past A (last program) contribute nothing
        for m0 in range(0, M, BLOCK):
            offs = m0 + tl.arange(0, BLOCK)
            inb = offs < m_lim
            x = tl.load(row + offs.to(tl.int64) * s_m, mask=inb, other=0.0).to(tl.float32)
            key = _order_key(x)
            digit = (key >> SHIFT) & 0xFF
            if IS_TOP:
                digit = digit ^ 0x80
                ok = inb
            else:
                ok = inb & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
            digit = tl.where(ok, digit, 256)
            hist += tl.histogram(digit, 512)
    tl.store(part_ptr + (g.to(tl.int64) * n_prog + p) * 512 + tl.arange(0, 512), hist)


def radix_kth_largest(h3: torch.Tensor, kth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h3 [A, G, M]`` (any strides), ``kth [G]`` int64 in [1, A*M] -> ``(tau [G] fp32, krem [G])``:
    tau the kth-largest value of each group; krem how many elements equal to tau are needed to make
    exactly kth (the rest of the kth are > tau). Over ranks, ``kernels.selection`` refines a local
    pick; this kernel stays local."""
    a_dim, g_dim, m_dim = h3.shape
    dev = h3.device
    rows_per_prog = max(1, triton.cdiv(a_dim, max(1, _TARGET_PROGRAMS // max(g_dim, 1))))
    n_prog = triton.cdiv(a_dim, rows_per_prog)
    block = min(_BLOCK, triton.next_power_of_2(max(m_dim, 16)))
    prefix_u = torch.zeros(g_dim, dtype=torch.int64, device=dev)  # unsigned key prefix, as int64
    krem = kth.to(device=dev, dtype=torch.int64).clone()
    part = torch.empty((g_dim, n_prog, 512), dtype=torch.int32, device=dev)
    for shift in (24, 16, 8, 0):
        prefix_s = (prefix_u - 2**31).to(torch.int32)
        _radix_hist_kernel[launch.grid(g_dim, n_prog)](
            h3,
            part,
            prefix_s,
            a_dim,
            m_dim,
            rows_per_prog,
            *h3.stride(),
            SHIFT=shift,
            IS_TOP=(shift == 24),
            BLOCK=block,
        )
        hist = part.sum(1, dtype=torch.int64)[:, :256].contiguous()  # [G, 256]
        cum_ge = hist.flip(-1).cumsum(-1).flip(-1)  # elements with digit >= d
        digit = (cum_ge >= krem[:, None]).sum(-1) - 1  # cum_ge falls with d: the Trues are 0..digit
        digit = digit.clamp(0, 255)
        nxt = (digit + 1).clamp(max=255)
        above = torch.where(digit < 255, cum_ge.gather(1, nxt[:, None]).squeeze(1), 0)
        krem = krem - above
        prefix_u = prefix_u | (digit << shift)
    key = (prefix_u - 2**31).to(torch.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), krem


@triton.jit
def _compact_kernel(
    h_ptr,
    tau_ptr,
    krem_ptr,
    idx_ptr,
    cnt_ptr,
    G,
    M,
    s_a,
    s_g,
    s_m,
    s_oa,
    s_og,
    MODE: tl.constexpr,
    EXACT: tl.constexpr,
    WRITE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # MODE 0: h >= tau and h > 0; 1: h >= tau; 2: h != 0.  EXACT: take h > tau plus the first
    # krem[g] entries equal to tau (TopK: exactly k per row). WRITE=False only counts.
    # One program per (a, g) row on grid axis 0 (up to 2^31 - 1 rows; axis 1 stops at 65,535).
    pid = tl.program_id(0)
    a = pid // G
    g = pid % G
    row = h_ptr + a.to(tl.int64) * s_a + g.to(tl.int64) * s_g
    out = idx_ptr + a.to(tl.int64) * s_oa + g.to(tl.int64) * s_og
    tau = tl.load(tau_ptr + g)
    if EXACT:
        krem = tl.load(krem_ptr + g).to(tl.int32)
    run = a * 0  # int32 scalar tensors, so the loop-carried types are stable when compiled
    run_eq = a * 0
    for m0 in range(0, M, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        inb = offs < M
        x = tl.load(row + offs.to(tl.int64) * s_m, mask=inb, other=0.0).to(tl.float32)
        if MODE == 2:
            sel = inb & (x != 0.0)
        elif EXACT:
            eq = inb & (x == tau)
            eq_rank = run_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
            sel = inb & ((x > tau) | (eq & (eq_rank < krem)))
            run_eq += tl.sum(eq.to(tl.int32), 0)
        else:
            sel = inb & (x >= tau)
            if MODE == 0:
                sel = sel & (x > 0.0)
        sel_i = sel.to(tl.int32)
        if WRITE:
            pos = run + tl.cumsum(sel_i, 0) - 1
            tl.store(out + pos, offs.to(tl.int64), mask=sel)
        run += tl.sum(sel_i, 0)
    if not WRITE:
        tl.store(cnt_ptr + pid.to(tl.int64), run)


_MODE_ID = {"positive": 0, "ge": 1, "nonzero": 2}


def _block_for(m: int) -> int:
    return min(_BLOCK, triton.next_power_of_2(max(m, 16)))


def compact(h3: torch.Tensor, tau: torch.Tensor, mode: str = "positive") -> torch.Tensor:
    """``h3 [A, G, M]``, ``tau [G]`` -> ``idx [A, G, K]`` int64, -1 padded (K = largest row count;
    one host sync to learn it)."""
    a_dim, g_dim, m_dim = h3.shape
    tau = tau.to(device=h3.device, dtype=torch.float32).contiguous()
    counts = torch.empty((a_dim, g_dim), dtype=torch.int32, device=h3.device)
    block = _block_for(m_dim)
    _compact_kernel[launch.grid(a_dim * g_dim)](
        h3,
        tau,
        tau,
        counts,
        counts,
        g_dim,
        m_dim,
        *h3.stride(),
        0,
        0,
        MODE=_MODE_ID[mode],
        EXACT=False,
        WRITE=False,
        BLOCK=block,
    )
    width = int(counts.max()) if counts.numel() else 0
    idx = torch.full((a_dim, g_dim, width), -1, dtype=torch.long, device=h3.device)
    if width > 0:
        _compact_kernel[launch.grid(a_dim * g_dim)](
            h3,
            tau,
            tau,
            idx,
            counts,
            g_dim,
            m_dim,
            *h3.stride(),
            idx.stride(0),
            idx.stride(1),
            MODE=_MODE_ID[mode],
            EXACT=False,
            WRITE=True,
            BLOCK=block,
        )
    return idx


def topk_select(h: torch.Tensor, k: int) -> torch.Tensor:
    """``h [N, M]`` -> ``idx [N, k]`` int64 of the k largest per row, ascending ids (ties: first)."""
    n, m = h.shape
    h3 = h.unsqueeze(0)  # [1, N, M]: one group per row
    kth = torch.full((n,), k, dtype=torch.long, device=h.device)
    tau, krem = radix_kth_largest(h3, kth)
    idx = torch.empty((1, n, k), dtype=torch.long, device=h.device)
    _compact_kernel[launch.grid(n)](
        h3,
        tau,
        krem.to(torch.int32),
        idx,
        idx,
        n,
        m,
        *h3.stride(),
        idx.stride(0),
        idx.stride(1),
        MODE=1,
        EXACT=True,
        WRITE=True,
        BLOCK=_block_for(m),
    )
    return idx[0]
