"""Shuffle buffer: passes are permutations of their refill; resume equals an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from helpers import CountingLoader, id_rows

from torchtitan_clt.data.buffer import ShuffleBuffer

_extract = id_rows


def _buffer(passes=2, seed=0):
    return ShuffleBuffer(CountingLoader(), _extract, buffer_tokens=12, passes=passes, seed=seed)


def _ids(x):
    return x[:, 0, 0].long()


def test_refills_passes_and_pairing():
    buf = _buffer(passes=2)
    served = torch.cat([_ids(buf.next_batch(5)[0]) for _ in range(12)])  # 60 rows
    n = 15  # 12 rows rounded up to whole batches of 5
    chunks = served.split(n)
    for k, chunk in enumerate(chunks):
        refill = k // 2  # two passes over each refill
        assert sorted(chunk.tolist()) == list(range(refill * n, (refill + 1) * n))
    assert not torch.equal(chunks[0], chunks[1])  # each pass is reshuffled
    x, y = buf.next_batch(7)
    torch.testing.assert_close(y, -x)


@pytest.mark.parametrize("stop", [0, 1, 3, 6, 7])
def test_resume_equals_uninterrupted(stop):
    ref = _buffer()
    want = [ref.next_batch(4) for _ in range(stop + 10)]
    a = _buffer()
    for _ in range(stop):
        a.next_batch(4)
    sd = a.state_dict()
    b = _buffer()
    b.load_state_dict(sd)
    got = [b.next_batch(4) for _ in range(10)]
    for (wx, wy), (gx, gy) in zip(want[stop:], got):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)


def test_seed_changes_order():
    a = torch.cat([_ids(_buffer(seed=0).next_batch(15)[0])])
    b = torch.cat([_ids(_buffer(seed=1).next_batch(15)[0])])
    assert sorted(a.tolist()) == sorted(b.tolist()) and not torch.equal(a, b)


def test_capacity_is_buffer_tokens_rounded_up_to_one_chunk_and_logged():
    from torchtitan_clt.data.source import buffer_log

    for tokens, want in ((12, 15), (15, 15), (16, 20), (1, 5)):  # chunks of 5 rows
        buf = ShuffleBuffer(CountingLoader(), _extract, tokens, 1, prefetch=True)
        buf.next_batch(1)
        buf._job.join()  # the second slot is filled in the background
        slots = [s for s in buf._slots if s.x is not None]
        assert len(slots) == 2 and {(s.x.shape[0], s.y.shape[0]) for s in slots} == {(want, want)}
        assert buf.capacity(5) == want <= tokens + 5 - 1
        held = sum(t.numel() * t.element_size() for s in slots for t in (s.x, s.y))
        row_bytes = 2 * 2 * 3 * 4  # x and y rows of 2 × 3 fp32
        assert f"buffer {want} rows × 2 slots ({held / 2**30:.2f} GiB" in buffer_log(buf, 5, row_bytes)
        buf.close()
