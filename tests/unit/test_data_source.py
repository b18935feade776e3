"""Activation sources end to end: stream (tiny LLM on text) and synthetic; resume; dp ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchtitan_clt.config import JobConfig
from torchtitan_clt.config.manager import ConfigError
from torchtitan_clt.data import SourceContext, build_eval_token_loader, load_llm
from torchtitan_clt.data.extraction import ActivationExtractor
from torchtitan_clt.data.synthetic import SyntheticSource
from torchtitan_clt.data.text import TextSpec
from torchtitan_clt.data.tokenize import build_token_loader
from torchtitan_clt.protocols import data_source_registry

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _cfg(**data) -> JobConfig:
    cfg = JobConfig()
    d = cfg.data
    d.model_path = str(ASSETS / "tiny_llama")
    d.dataset = "shakespeare"
    d.seq_len = 16
    d.llm_batch_size = 2
    d.layers = [0, 2]
    d.buffer_tokens = 40  # 30 rows per LLM batch: refills of 60 rows
    d.buffer_passes = 2
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


def _build(cfg, **ctx):
    return data_source_registry.get(cfg.data.source)(cfg, SourceContext(**ctx))


def test_stream_shapes_and_values():
    # No prefetch: the test runs its own extractor on the source's LLM (hooks on the same modules).
    cfg = _cfg(prefetch=False)
    src = _build(cfg)
    assert (src.n_layers, src.d_in, src.d_out, src.layers) == (2, 64, 64, [0, 2])
    assert (src.hook_in, src.hook_out) == ("resid_mid", "mlp_out")
    x, y = src.next_batch(50)
    assert x.shape == (50, 2, 64) and y.shape == (50, 2, 64) and x.dtype == torch.float32
    # The rows are rows of a direct extraction of the first refill's contexts, x and y paired.
    loader = build_token_loader(TextSpec("shakespeare"), src.llm.tokenizer, 16, 2)
    ext = ActivationExtractor(src.llm.model, "resid_mid", "mlp_out", [0, 2])
    pairs = [ext(b) for _, b in zip(range(2), loader)]
    rx, ry = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    # Matched by nearest row within float tolerance (batching may round the last bits differently).
    for i in range(50):
        dist = (rx - x[i]).flatten(1).abs().amax(-1)
        j = int(dist.argmin())
        assert dist[j] < 1e-4 * (1 + x[i].abs().max()), float(dist[j])
        torch.testing.assert_close(ry[j], y[i], rtol=1e-4, atol=1e-4)
    src.close()


@pytest.mark.parametrize("stop,workers", [(1, 0), (4, 0), (4, 2)])
def test_stream_resume_equals_uninterrupted(stop, workers):
    cfg = _cfg(num_workers=workers)
    ref = _build(cfg, seed=3)
    want = [ref.next_batch(25) for _ in range(stop + 6)]
    a = _build(cfg, seed=3)
    for _ in range(stop):
        a.next_batch(25)
    sd = a.state_dict()
    b = _build(cfg, seed=3)
    b.load_state_dict(sd)
    for (wx, wy), (gx, gy) in zip(want[stop:], [b.next_batch(25) for _ in range(6)]):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    other = _cfg(layers=[1])
    with pytest.raises(ConfigError, match="differs"):
        _build(other).load_state_dict(sd)


def test_dp_ranks_get_different_data():
    cfg = _cfg(buffer_passes=1)
    x0, _ = _build(cfg, dp_rank=0, dp_degree=2).next_batch(30)
    x1, _ = _build(cfg, dp_rank=1, dp_degree=2).next_batch(30)
    flat0, flat1 = x0.reshape(30, -1), x1.reshape(30, -1)
    assert not (flat0[:, None] == flat1[None]).all(-1).any()  # no row in common


def test_resume_on_more_ranks_finishes_the_old_refills_with_the_llm():
    # 2 ranks -> 3 ranks of 6 text shards. Refills of 60 rows; each old rank stops 20 rows into its
    # second refill. New ranks 0 and 1 replay those refills through the LLM and serve exactly the
    # 40 rows each old rank had left (bit for bit: same batches, same model); new rank 2 adopts none.
    cfg = _cfg(buffer_passes=1, text_shards=6)
    old = [_build(cfg, dp_rank=r, dp_degree=2, seed=1) for r in range(2)]
    ref = [_build(cfg, dp_rank=r, dp_degree=2, seed=1) for r in range(2)]
    for src in (*old, *ref):
        src.next_batch(40)
        src.next_batch(40)
    owed = [ref[r].next_batch(40)[0].flatten(1) for r in range(2)]
    sds = [src.state_dict() for src in old]
    new = [_build(cfg, dp_rank=r, dp_degree=3, seed=1) for r in range(3)]
    for src in new:
        src.load_state_dict_from_ranks(sds)
    for r in range(2):
        got = new[r].next_batch(40)[0].flatten(1)
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, owed[r].tolist()))
    x, _ = new[2].next_batch(40)  # its own shard 4 of 6, from where old rank 1's refill ended
    assert x.shape == (40, 2, 64)
    assert new[2].loader.dataset.worker_shards() == [4, 5]
    assert not (x.flatten(1)[:, None] == torch.cat(owed)[None]).all(-1).any()  # no row served twice
    for src in (*old, *ref, *new):
        src.close()


def test_stream_errors():
    with pytest.raises(ConfigError, match="4 layers"):
        _build(_cfg(layers=[1, 7]))
    with pytest.raises(ConfigError, match="gguf"):
        _build(_cfg(model_path="gguf:no_such_pkg/x.gguf"))


def test_eval_loader_is_held_out(tmp_path):
    import json

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc{i:03d}"}) + "\n" for i in range(300)))
    cfg = _cfg(dataset=str(path), seq_len=8)
    _, tok = load_llm(cfg.data.model_path)
    batches = list(build_eval_token_loader(cfg, tok, batch_size=1))
    text = "".join(tok.decode(b[0, 1:]) for b in batches)
    assert "doc099" in text and "doc199" in text and "doc100" not in text


def test_synthetic_deterministic_resumable_and_structured():
    cfg = JobConfig()
    cfg.data.source = "synthetic"
    cfg.data.synthetic_n_layers, cfg.data.synthetic_d_model = 3, 16
    a, b = _build(cfg, seed=5), _build(cfg, seed=5)
    xa, ya = a.next_batch(32)
    xb, yb = b.next_batch(32)
    assert xa.shape == (32, 3, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    sd = a.state_dict()
    want = a.next_batch(8)
    c = _build(cfg, seed=5)
    c.load_state_dict(sd)
    got = c.next_batch(8)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    other_rank = _build(cfg, seed=5, dp_rank=1).next_batch(32)[0]
    assert not torch.equal(other_rank, xa)
    # One noise-free feature per row: x and y are the same magnitude along a matching D / E pair.
    s = SyntheticSource(2, 16, SourceContext(seed=0), n_features=40, k=1, noise=0.0)
    x, y = s.next_batch(64)
    proj = torch.einsum("bld,fd->blf", x, s.D)
    f = proj.abs().argmax(-1)
    mag = x.norm(dim=-1)
    torch.testing.assert_close(x, s.D[f] * mag[..., None])
    torch.testing.assert_close(y, s.E[f] * mag[..., None])
