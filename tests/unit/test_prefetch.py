"""Prefetch: the next refill is extracted in the background; batches and resume are unchanged."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import CountingLoader, id_rows

from torchtitan_clt.config import JobConfig
from torchtitan_clt.data import SourceContext
from torchtitan_clt.data.buffer import ShuffleBuffer
from torchtitan_clt.protocols import data_source_registry

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _extract(ids, delay: float = 0.0):  # x carries the row id, y its negation
    if delay:
        time.sleep(delay)  # a slow LLM: the training thread would race ahead of a naive prefetch
    return id_rows(ids)


def _buffer(prefetch, passes=2, delay=0.0, loader=None):
    return ShuffleBuffer(
        loader or CountingLoader(), lambda t: _extract(t, delay), 12, passes, seed=5, prefetch=prefetch
    )


@pytest.mark.parametrize("passes", [1, 2])
def test_prefetch_same_batches(passes):
    plain, ahead = _buffer(False, passes), _buffer(True, passes, delay=0.002)
    for _ in range(25):  # batches of 7 over refills of 15 rows: spans refill boundaries
        (px, py), (ax, ay) = plain.next_batch(7), ahead.next_batch(7)
        assert torch.equal(px, ax) and torch.equal(py, ay)
    ahead.close()


def test_next_refill_is_extracted_in_the_background():
    loader = CountingLoader()
    buf = _buffer(True, loader=loader)
    buf.next_batch(1)  # first refill (3 batches of 5) in the foreground, then the next one starts
    assert buf._job is not None
    buf._job.join()
    assert loader.next_id == 30  # two refills extracted though only one was asked for
    buf.close()
    plain_loader = CountingLoader()
    _buffer(False, loader=plain_loader).next_batch(1)
    assert plain_loader.next_id == 15


@pytest.mark.parametrize("stop", [0, 2, 5, 9])
def test_prefetch_resume_exact(stop):
    ref = _buffer(False)
    want = [ref.next_batch(4) for _ in range(stop + 12)]
    a = _buffer(True, delay=0.001)
    for _ in range(stop):
        a.next_batch(4)
    sd = a.state_dict()  # taken while the next refill may be half extracted
    a.close()
    b = _buffer(True)
    b.load_state_dict(sd)
    for (wx, wy), (gx, gy) in zip(want[stop:], [b.next_batch(4) for _ in range(12)]):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    b.close()


def test_prefetch_error_reaches_the_training_thread_and_close_stops_it():
    calls = []

    def failing(ids):
        calls.append(1)
        if len(calls) > 4:
            raise ValueError("broken batch")
        return _extract(ids)

    buf = ShuffleBuffer(CountingLoader(), failing, 12, 1, prefetch=True)
    buf.next_batch(15)  # first refill; the second fails in the background
    with pytest.raises(ValueError, match="broken batch"):
        buf.next_batch(1)
    slow = _buffer(True, delay=0.05)
    slow.next_batch(1)
    job = slow._job
    slow.close()  # cancels between two extractions instead of finishing the refill
    assert job is not None and not job.is_alive() and slow._job is None and slow.x is None
    assert not [t for t in threading.enumerate() if t.name == "tclt-refill"]


def _stream(prefetch: bool):
    cfg = JobConfig()
    d = cfg.data
    d.model_path, d.dataset = str(ASSETS / "tiny_llama"), str(ASSETS / "tiny_text.txt")
    d.seq_len, d.llm_batch_size, d.layers = 9, 2, [1, 3]
    d.buffer_tokens, d.buffer_passes, d.prefetch = 40, 1, prefetch
    return data_source_registry.get("stream")(cfg, SourceContext(seed=2))


def test_stream_source_prefetch_same_batches_and_resume(caplog):
    with caplog.at_level("INFO", logger="torchtitan_clt.data.source"):
        plain, ahead = _stream(False), _stream(True)
    # The log states the rows really allocated: 40 rounded up to chunks of 2 × 8 rows, per slot.
    assert "buffer 48 rows × 1 slot (" in caplog.text and "buffer 48 rows × 2 slots (" in caplog.text
    assert plain.llm_n_layers == 4 and plain.n_layers == 2  # the LLM's depth, not the dictionary's
    want = [plain.next_batch(24) for _ in range(8)]
    got = [ahead.next_batch(24) for _ in range(5)]
    sd = ahead.state_dict()
    resumed = _stream(True)
    resumed.load_state_dict(sd)
    got += [resumed.next_batch(24) for _ in range(3)]
    for (wx, wy), (gx, gy) in zip(want, got):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    assert {s.x.shape[0] for s in ahead.buffer._slots} == {48}
    for s in (plain, ahead, resumed):
        s.close()
