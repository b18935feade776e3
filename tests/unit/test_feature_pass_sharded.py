"""The feature pass over ranks (issue 26: a sharded end of run): two gloo ranks, each reading only
its half of every layer's features from a circuit-tracer export, write the files one process writes
from the whole dictionary.

A JumpReLU CLT with a skip path on the tiny Llama is exported for circuit-tracer; one process runs
``run_feature_pass`` on the whole export, two ranks ``run_feature_pass`` on their
``finish.export_share`` of it, on the same text.
Every feature file, browser page and index row must agree (activations within 1e-5: the ranks' encoder
matmuls are narrower, which may reorder fp32 sums), the summary too; each rank must have loaded
exactly its share of the features (no whole layer), and the random sample must be the same contexts
(its keys are a hash of (context, feature), not a generator's stream)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks, tiny_model

ROOT = Path(__file__).resolve().parents[2]
L, D, F = 4, 64, 24  # the tiny Llama's 4 layers of width 64
TOKENS = 6 * 64


def _cfg():
    from torchtitan_clt.config import load_config

    return load_config(["--config", str(ROOT / "train_configs" / "debug_model.toml"), "--data.seq_len=64"])


def _batches(cfg, llm):
    from torchtitan_clt.data.pipeline import token_loader

    return token_loader(cfg, llm.tokenizer, 2, held_out=True)


def _export(folder: Path) -> None:
    from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer

    m = tiny_model("clt", "jumprelu", L=L, d=D, F=F, seed=3, skip_connection=True)
    with torch.no_grad():  # thresholds that leave a few features firing per token
        m.activation.log_threshold.fill_(torch.log(torch.tensor(0.05)))
        m.b_enc.copy_(0.3 * torch.randn(m.b_enc.shape, generator=torch.Generator().manual_seed(0)))
    export_circuit_tracer(m, folder)


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=rank, world_size=2)
    try:
        import torchtitan_clt.checkpoint.circuit_tracer as ct
        from torchtitan_clt.data.pipeline import load_llm_handle
        from torchtitan_clt.metrics.feature_files import run_feature_pass
        from torchtitan_clt.trainer.finish import export_share

        loaded = []
        real = ct.load_circuit_tracer

        def spy(*a, **kw):
            m = real(*a, **kw)
            loaded.append((kw.get("features"), m.args.features_per_layer, [tuple(w.shape) for w in m.W_dec]))
            return m

        ct.load_circuit_tracer = spy
        cfg = _cfg()
        llm = load_llm_handle(cfg, "cpu")
        share, tc = export_share(Path(tmp) / "ct")
        summary = run_feature_pass(
            tc, llm, _batches(cfg, llm), TOKENS, Path(tmp) / "sharded", 3, {"name": "t"}, share=share
        )
        Path(tmp, f"rank{rank}.json").write_text(json.dumps({"loaded": loaded, "summary": summary}))
    finally:
        dist.destroy_process_group()


def _close(a, b, path: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (path, a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys() ^ b.keys())
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def _js(text: str):
    body = text[text.index("(") + 1 : text.rindex(")")] if text.startswith("showFeature") else text
    return json.loads(body.split("=", 1)[1].rstrip(";\n") if body.startswith("const") else body)


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(tmp_path):
    from torchtitan_clt.checkpoint.circuit_tracer import load_circuit_tracer
    from torchtitan_clt.data.pipeline import load_llm_handle
    from torchtitan_clt.metrics.feature_files import run_feature_pass

    _export(tmp_path / "ct")
    cfg = _cfg()
    llm = load_llm_handle(cfg, "cpu")
    ref = run_feature_pass(
        load_circuit_tracer(tmp_path / "ct"),
        llm,
        _batches(cfg, llm),
        TOKENS,
        tmp_path / "one",
        3,
        {"name": "t"},
    )
    assert ref["fired"] > 10  # enough features fire for the comparison to mean something
    run_ranks(_worker, (str(tmp_path),), 2)

    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        [(features, f, dec_shapes)] = got["loaded"]
        assert features == [rank * F // 2, (rank + 1) * F // 2] and f == F // 2  # its share only
        assert dec_shapes == [[F // 2, L - s, D] for s in range(L)]
        summary = {k: v for k, v in got["summary"].items() if k != "seconds"}
        _close(summary, {k: v for k, v in ref.items() if k != "seconds"}, "summary")

    one, two = tmp_path / "one", tmp_path / "sharded"
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert sum(f.endswith(".json") and "/" not in f and f != "summary.json" for f in files) == ref["fired"]
    for name in files:
        a, b = (one / name).read_text(), (two / name).read_text()
        if name.endswith(".html"):
            assert a == b, name
        elif name == "summary.json":
            continue  # compared above (its "seconds" differ)
        else:
            _close(_js(b), _js(a), name)
    assert os.path.exists(two / "index.html")
