"""Per-shard initialisation: every rank draws only its own shard, and the weights do not depend on
the mesh.

Each parameter's initial value is a *virtual* full fp32 tensor, a function of (seed, tag, full
shape) alone. Its flat (row-major) index is cut into fixed chunks of ``INIT_CHUNK`` elements, and
chunk c is drawn from its own ``torch.Generator`` seeded by ``derived_seed(seed, f"{tag}/{c}")``.
A rank's shard is a *box* (one ``[lo, hi)`` range per dim, ``shard_box``: from the DTensor's mesh
coordinate and placements); ``init_param_`` streams the chunks that meet the box into the local
tensor, so init allocates the local shard (already there after ``to_empty``) plus O(chunk).

Derived values are computed from the virtual tensors as well, in an order fixed by the full shape:
row norms (``RowNormalized``: a row's sum of squares is the sum, in chunk order, of what each chunk
holds of it, whatever box asked), tied encoders (``FirstTarget``: a CLT's W_enc,s = W_dec,s[:, 0];
a PLT / SAE passes its decoder itself), MOLT transform norms (``TransformScaled``: per aligned
group of transforms). So 1 process, FSDP, TP, FSDP×TP and HSDP hold the same bits.
"""

from __future__ import annotations

import hashlib
import math
from itertools import product

import torch

INIT_CHUNK = 1 << 20
"""Elements per generator: the chunk layout (and so the values) depends only on the full shape."""

Box = tuple[tuple[int, int], ...]


def derived_seed(seed: int, tag: str) -> int:
    digest = hashlib.sha256(f"{seed}/{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def full_box(shape) -> Box:
    return tuple((0, int(n)) for n in shape)


def shard_box(t: torch.Tensor) -> Box:
    """The index box of the full tensor that this rank's local shard of ``t`` holds.

    ``Shard`` placements split a dim in mesh order, DTensor's way (ceil-sized chunks, the last
    ones short or empty); FSDP2's ``_StridedShard(dim, split_factor=sf)`` splits the part left by
    the placements to its right on the same dim (whose sizes multiply to sf), as fully_shard does
    for a tp-sharded parameter; ``Replicate`` keeps the dim whole. Checked against the local shape."""
    if not _is_dtensor(t):
        return full_box(t.shape)
    mesh, placements, ndim = t.device_mesh, tuple(t.placements), t.dim()
    coord = mesh.get_coordinate()
    local_shape = tuple(t.to_local().shape)
    if coord is None:  # not in the mesh: an empty shard
        return tuple((0, 0) for _ in range(ndim))
    order: dict[int, list[int]] = {}  # tensor dim -> mesh dims in the order they split it
    pending: dict[int, list[list[int]]] = {}  # tensor dim -> [[mesh dim, split factor left]]
    for i, p in enumerate(placements):
        kind = type(p).__name__
        if kind == "Replicate":
            continue
        if kind not in ("Shard", "_StridedShard"):
            raise NotImplementedError(f"per-shard init: placement {p!r} on mesh dim {i} is not supported")
        d = p.dim % ndim
        if kind == "_StridedShard":
            pending.setdefault(d, []).append([i, int(p.split_factor)])
            continue
        order.setdefault(d, []).append(i)
        for entry in pending.get(d, []):
            if entry[1] > 1:
                if entry[1] % mesh.size(i):
                    raise NotImplementedError(f"per-shard init: {placements} on {mesh} (split factor)")
                entry[1] //= mesh.size(i)
        for entry in [e for e in pending.get(d, []) if e[1] == 1]:
            pending[d].remove(entry)
            order[d].append(entry[0])
    if any(pending.values()):
        raise NotImplementedError(f"per-shard init: {placements} on {mesh} (unmatched _StridedShard)")
    box = []
    for d in range(ndim):
        lo, n = 0, int(t.shape[d])
        for i in order.get(d, []):
            m, r = mesh.size(i), coord[i]
            step = -(-n // m)
            a = min(r * step, n)
            lo, n = lo + a, min(a + step, n) - a
        box.append((lo, lo + n))
    sizes = tuple(hi - lo for lo, hi in box)
    if sizes != local_shape:
        raise RuntimeError(
            f"per-shard init: box {box} of {placements} does not match local shape {local_shape}"
        )
    return tuple(box)


def _contains(outer: Box, inner: Box) -> bool:
    return all(a <= c and d <= b for (a, b), (c, d) in zip(outer, inner))


def _rel(box: Box, origin: Box) -> tuple[slice, ...]:
    return tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(box, origin))


def _ravel(idx, shape) -> int:
    flat = 0
    for i, n in zip(idx, shape):
        flat = flat * n + i
    return flat


def _flat_blocks(a: int, b: int, shape) -> list[Box]:
    """Boxes whose union is the flat range [a, b) of ``shape``, each contiguous, in flat order."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [((a, b),)]
    inner = math.prod(shape[1:])
    (ra, oa), (rb, ob) = divmod(a, inner), divmod(b, inner)
    if ra == rb:
        return [((ra, ra + 1), *sub) for sub in _flat_blocks(oa, ob, shape[1:])]
    out = []
    if oa:
        out += [((ra, ra + 1), *sub) for sub in _flat_blocks(oa, inner, shape[1:])]
        ra += 1
    if rb > ra:
        out.append(((ra, rb), *full_box(shape[1:])))
    if ob:
        out += [((rb, rb + 1), *sub) for sub in _flat_blocks(0, ob, shape[1:])]
    return out


class Virtual:
    """A full tensor defined by the seed; ``fill_(out, box)`` writes its ``box`` into ``out``."""

    shape: tuple[int, ...]

    def __init__(self, shape):
        self.shape = tuple(int(n) for n in shape)
        self._held: list[tuple[Box, torch.Tensor]] = []

    def hold(self, box: Box, t: torch.Tensor) -> None:
        """Remember that ``t`` (a parameter's local shard, fp32) holds ``box``: later reads inside
        it are copied instead of drawn again (tied encoders under tp)."""
        if t.dtype == torch.float32:
            self._held.append((box, t))

    def fill_(self, out: torch.Tensor, box: Box) -> None:
        for hbox, t in self._held:
            if _contains(hbox, box):
                out.copy_(t[_rel(box, hbox)])
                return
        self._fill(out, box)

    def _fill(self, out: torch.Tensor, box: Box) -> None:
        raise NotImplementedError

    def read(self, box: Box) -> torch.Tensor:
        out = torch.empty([hi - lo for lo, hi in box])
        self.fill_(out, box)
        return out


class Constant(Virtual):
    def __init__(self, shape, value: float = 0.0):
        super().__init__(shape)
        self.value = value

    def _fill(self, out, box):
        out.fill_(self.value)


class Drawn(Virtual):
    """i.i.d. draws: ``uniform`` U(±scale) or ``normal`` N(0, scale²), chunk by chunk."""

    def __init__(self, seed: int, tag: str, shape, dist: str, scale: float):
        super().__init__(shape)
        if dist not in ("uniform", "normal"):
            raise ValueError(f"unknown init distribution {dist!r}")
        self.seed, self.tag, self.dist, self.scale = seed, tag, dist, float(scale)
        self.chunk = INIT_CHUNK
        self.numel = math.prod(self.shape)

    def draw(self, c: int) -> torch.Tensor:
        """Chunk c: fp32 [n] for the flat range [c·chunk, c·chunk + n)."""
        n = min(self.chunk, self.numel - c * self.chunk)
        gen = torch.Generator().manual_seed(derived_seed(self.seed, f"{self.tag}/{c}"))
        if self.dist == "uniform":  # one pass each: a + (b − a)·u, μ + σ·z
            return torch.empty(n).uniform_(-self.scale, self.scale, generator=gen)
        return torch.empty(n).normal_(0.0, self.scale, generator=gen)

    def chunks(self, box: Box):
        """(c, values, [(block, block ∩ box)]) for each chunk that meets ``box``, in order."""
        if any(hi <= lo for lo, hi in box):
            return
        first = _ravel([lo for lo, _ in box], self.shape)
        last = _ravel([hi - 1 for _, hi in box], self.shape)
        for c in range(first // self.chunk, last // self.chunk + 1):
            parts = self.parts(c, box)
            if parts:
                yield c, self.draw(c), parts

    def parts(self, c: int, box: Box) -> list[tuple[Box, Box]]:
        """[(block, block ∩ box)]: the contiguous blocks of chunk c that meet ``box``."""
        a, out = c * self.chunk, []
        for blk in _flat_blocks(a, min(a + self.chunk, self.numel), self.shape):
            inter = tuple((max(p, q), min(r, s)) for (p, r), (q, s) in zip(blk, box))
            if all(lo < hi for lo, hi in inter):
                out.append((blk, inter))
        return out

    def _write(self, out, box, c, vals, parts, row_scale=None, lead=0):
        a = c * self.chunk
        for blk, inter in parts:
            off = _ravel([lo for lo, _ in blk], self.shape) - a
            size = [hi - lo for lo, hi in blk]
            src = vals[off : off + math.prod(size)].view(size)[_rel(inter, blk)]
            if row_scale is not None:
                s = row_scale[_rel(inter[:lead], box[:lead])]
                src = src * s.view(*s.shape, *([1] * (len(size) - lead)))
            out[_rel(inter, box)].copy_(src)

    def _fill(self, out, box):
        for c, vals, parts in self.chunks(box):
            self._write(out, box, c, vals, parts)
            del vals  # before the next chunk is drawn: one chunk alive at a time

    def fill_scaled_(self, out, box, row_scale: torch.Tensor, lead: int) -> None:
        """``box`` of this tensor times ``row_scale``  # [box sizes of the first ``lead`` dims]."""
        for c, vals, parts in self.chunks(box):
            self._write(out, box, c, vals, parts, row_scale, lead)
            del vals

    def row_sumsq_(self, acc: torch.Tensor, lead_box: Box, c: int, vals: torch.Tensor) -> None:
        """Add chunk c's share of each row's sum of squares (fp64) into ``acc``  # [lead box sizes].

        A row is everything after the first ``len(lead_box)`` dims (a contiguous flat range); the
        chunk's pieces are summed whatever box asked, so every mesh gets the same norms."""
        lead = len(lead_box)
        rl = math.prod(self.shape[lead:])
        a, n = c * self.chunk, vals.numel()
        v = vals.double().square_()
        head = (rl - a % rl) % rl
        nfull = (n - min(head, n)) // rl
        sums = [v[: min(head, n)].sum().view(1)] if head else []
        sums.append(v[min(head, n) : min(head, n) + nfull * rl].view(nfull, rl).sum(1))
        if head + nfull * rl < n:
            sums.append(v[head + nfull * rl :].sum().view(1))
        sums = torch.cat(sums)
        rows = torch.arange(a // rl, a // rl + sums.numel())
        pos, inside = torch.zeros_like(rows), torch.ones_like(rows, dtype=torch.bool)
        for i, ((lo, hi), size) in enumerate(zip(lead_box, self.shape[:lead])):
            stride = math.prod(self.shape[i + 1 : lead])
            idx = rows // stride % size
            inside &= (idx >= lo) & (idx < hi)
            pos = pos * (hi - lo) + (idx - lo)
        acc.view(-1).index_add_(0, pos[inside], sums[inside])


def _row_box(box: Box, shape, lead: int) -> Box:
    return (*box[:lead], *full_box(shape[lead:]))


class RowNormalized(Virtual):
    """``base`` with each row (the dims after the first ``lead``) scaled to L2 norm ``norm``."""

    def __init__(self, base: Drawn, lead: int, norm: float):
        super().__init__(base.shape)
        self.base, self.lead, self.norm = base, lead, float(norm)

    def _scale(self, acc: torch.Tensor) -> torch.Tensor:
        return (self.norm / acc.sqrt().clamp_min(1e-12)).float()

    def row_scale(self, lead_box: Box) -> torch.Tensor:
        acc = torch.zeros([hi - lo for lo, hi in lead_box], dtype=torch.float64)
        for c, vals, _ in self.base.chunks(_row_box(lead_box, self.shape, self.lead)):
            self.base.row_sumsq_(acc, lead_box, c, vals)
            del vals
        return self._scale(acc)

    def _fill(self, out, box):
        lead_box = box[: self.lead]
        if out.dtype != torch.float32:  # two passes: scale in fp32, round once
            self.base.fill_scaled_(out, box, self.row_scale(lead_box), self.lead)
            return
        acc = torch.zeros([hi - lo for lo, hi in lead_box], dtype=torch.float64)
        for c, vals, _ in self.base.chunks(_row_box(lead_box, self.shape, self.lead)):
            self.base.row_sumsq_(acc, lead_box, c, vals)
            self.base._write(out, box, c, vals, self.base.parts(c, box))
            del vals
        s = self._scale(acc).to(out.device)
        out.mul_(s.view(*s.shape, *([1] * (out.dim() - self.lead))))


class FirstTarget(Virtual):
    """A CLT's tied encoder  # [L, F, d]: layer s is ``decoders[s]``  # [F, L−s, d] at target 0."""

    def __init__(self, decoders: list[Virtual]):
        F, _, d = decoders[0].shape
        super().__init__((len(decoders), F, d))
        self.decoders = decoders

    def _fill(self, out, box):
        (l0, l1), rows, cols = box
        for s in range(l0, l1):
            self.decoders[s].fill_(out[s - l0].unsqueeze(1), (rows, (0, 1), cols))


class TransformScaled(Virtual):
    """A MOLT group's U  # [L, n, r, d_out], each transform scaled so that ‖U_j V_j‖_F = ``norm``.

    The norms are taken over aligned groups of transforms (about one chunk of U each), fixed by
    the shapes, from the Gram matrices ‖U V‖_F² = Σ (U Uᵀ) ⊙ (V Vᵀ)."""

    def __init__(self, U: Drawn, V: Virtual, norm: float):
        super().__init__(U.shape)
        self.U, self.V, self.norm = U, V, float(norm)
        _, _, r, d_out = U.shape
        self.group = max(1, U.chunk // (r * max(d_out, V.shape[-1])))

    def _fill(self, out, box):
        (l0, l1), (j0, j1) = box[:2]
        scale = torch.empty(l1 - l0, j1 - j0)
        G, n = self.group, self.shape[1]
        for layer, g in product(range(l0, l1), range(j0 // G, -(-j1 // G))):
            lo, hi = g * G, min((g + 1) * G, n)
            sub = ((layer, layer + 1), (lo, hi))
            U = self.U.read(_row_box(sub, self.U.shape, 2))[0]  # [G, r, d_out]
            V = self.V.read(_row_box(sub, self.V.shape, 2))[0]
            cur = ((U @ U.transpose(1, 2)) * (V @ V.transpose(1, 2))).sum((1, 2)).sqrt()
            a, b = max(lo, j0), min(hi, j1)
            scale[layer - l0, a - j0 : b - j0] = (self.norm / cur.clamp_min(1e-12))[a - lo : b - lo]
        self.U.fill_scaled_(out, box, scale, 2)


@torch.no_grad()
def init_param_(param: torch.Tensor, value: Virtual) -> None:
    """Write this rank's shard of ``value`` into ``param`` (a plain tensor or a DTensor)."""
    if tuple(param.shape) != value.shape:
        raise ValueError(f"init: parameter of shape {tuple(param.shape)} given values of shape {value.shape}")
    local = param.to_local() if _is_dtensor(param) else param.data
    box = shard_box(param)
    value.fill_(local, box)
    value.hold(box, local)
