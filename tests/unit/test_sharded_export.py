"""The native export's files: streamed safetensors equal ``save_file``'s bytes, a model over the
cap is split between tensors into shards with Hugging Face's index, ``load_pretrained`` reads both
layouts to the same model, and the errors say what is missing.

References: safetensors' own ``save_file`` (bytes), and the one-file export (values)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file, save_file

from torchtitan_clt.checkpoint.export import FORMAT, export_native, load_pretrained
from torchtitan_clt.checkpoint.plain import folded_cpu_copy
from torchtitan_clt.checkpoint.safetensors_stream import (
    INDEX_FILE,
    StreamedExport,
    StreamedFile,
    TensorSpec,
    plan_files,
)


def _specs(tensors):
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_streamed_file_is_save_file_byte_for_byte(tmp_path):
    """Any dtypes, names that sort differently as text and as numbers, empty and 0-d tensors,
    rows written in random order: the same bytes as safetensors writes."""
    rng = random.Random(0)
    for trial in range(5):
        g = torch.Generator().manual_seed(trial)
        tensors = {
            "W_dec.10": torch.randn(3, 2, generator=g).bfloat16(),
            "W_dec.2": torch.randn(4, 5, generator=g),
            "W_enc": torch.randn(3, 4, 2, generator=g).half(),
            "activation.threshold_updates": torch.arange(3 + trial),
            "mask": torch.rand(5, generator=g) > 0.5,
            "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
        }
        ref = tmp_path / f"ref{trial}.safetensors"
        save_file(tensors, str(ref), metadata={"format": FORMAT})
        out = StreamedFile(tmp_path / f"new{trial}.safetensors", _specs(tensors), {"format": FORMAT})
        pieces = [(k, j) for k, v in tensors.items() if v.dim() and v.shape[0] for j in range(v.shape[0])]
        pieces += [(k, None) for k, v in tensors.items() if not (v.dim() and v.shape[0])]
        rng.shuffle(pieces)
        for k, j in pieces:
            out.write(k, tensors[k] if j is None else tensors[k][j], row=j)
        out.close()
        assert out.path.read_bytes() == ref.read_bytes()


def test_an_unfinished_file_is_removed(tmp_path):
    out = StreamedFile(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2, 3))])
    out.write("a", torch.ones(3), row=0)
    with pytest.raises(RuntimeError, match="a not written whole"):
        out.close()
    assert not (tmp_path / "x.safetensors").exists()
    out = StreamedFile(tmp_path / "y.safetensors", [TensorSpec("a", torch.float32, (2, 3))])
    with pytest.raises(ValueError, match=r"a\[0\]: got torch.int64"):
        out.write("a", torch.ones(3, dtype=torch.int64), row=0)
    with pytest.raises(ValueError, match=r"a\[1\]: got torch.float32 \[4\]"):
        out.write("a", torch.ones(4), row=1)


def test_a_cast_is_written_a_chunk_at_a_time(tmp_path, monkeypatch):
    """fp32 rows written into a bf16 file: the bytes of a whole cast, in pieces of at most
    CAST_CHUNK_BYTES (no whole bf16 copy of the tensor)."""
    from safetensors.torch import load_file

    from torchtitan_clt.checkpoint import safetensors_stream as sts

    monkeypatch.setattr(sts, "CAST_CHUNK_BYTES", 64)  # 32 bf16 elements a piece
    pieces: list[int] = []
    real_put = sts.StreamedFile._put
    monkeypatch.setattr(
        sts.StreamedFile, "_put", lambda self, p: (pieces.append(p.numel()), real_put(self, p))
    )
    w = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(0))  # 100 elements a row
    b = torch.randn(7)
    out = StreamedFile(tmp_path / "c.safetensors", [TensorSpec("w", torch.bfloat16, (3, 5, 20)),
                                                    TensorSpec("b", torch.bfloat16, (7,))])  # fmt: skip
    for j in (2, 0, 1):
        out.write("w", w[j], row=j)
    out.write("b", b)
    out.close()
    assert pieces == [32, 32, 32, 4] * 3 + [7]
    got = load_file(str(tmp_path / "c.safetensors"))
    assert torch.equal(got["w"], w.to(torch.bfloat16)) and torch.equal(got["b"], b.to(torch.bfloat16))


def test_plan_cuts_between_tensors_in_order():
    specs = [
        TensorSpec(n, torch.float32, (s,)) for n, s in [("a", 10), ("b", 10), ("c", 30), ("d", 5), ("e", 5)]
    ]
    groups = plan_files(specs, max_bytes=80)  # 40, 40, 120, 20, 20 bytes
    assert [[s.name for s in g] for g in groups] == [["a", "b"], ["c"], ["d", "e"]]
    assert [[s.name for s in g] for g in plan_files(specs, 10**6)] == [["a", "b", "c", "d", "e"]]


def _trained_like(family="clt", act="jumprelu"):
    m = tiny_model(family, act, L=4, d=8, F=16, skip_connection=True, model_name="tiny", seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    m.set_standardization(torch.randn(4, 8, generator=g), torch.rand(4, 8, generator=g) + 0.5,
                          torch.randn(4, 8, generator=g), torch.rand(4, 8, generator=g) + 0.5)  # fmt: skip
    return m.eval()


@pytest.mark.parametrize("family,act", [("clt", "jumprelu"), ("plt", "batchtopk")])
def test_sharded_layout_loads_as_the_single_file(tmp_path, family, act):
    m = _trained_like(family, act)
    one = export_native(m, tmp_path / "one", dtype=torch.bfloat16)
    # under the cap: exactly what save_file writes of the folded copy (today's export)
    copy = folded_cpu_copy(m)
    copy.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in copy.state_dict().items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": FORMAT})  # fmt: skip
    assert (one / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "model.safetensors"]

    cap = 1500  # bytes: several files, and W_dec.0 / the stacked tensors over it alone in theirs
    sharded = export_native(m, tmp_path / "sharded", dtype=torch.bfloat16, max_file_gb=cap / 1e9)
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    ref = load_file(str(tmp_path / "ref.safetensors"))
    assert set(index["weight_map"]) == set(ref) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    for name in files:
        part = load_file(str(sharded / name))
        assert all(index["weight_map"][k] == name and torch.equal(v, ref[k]) for k, v in part.items())
        size = sum(v.numel() * v.element_size() for v in part.values())
        assert size <= cap or len(part) == 1, (name, size)  # a tensor over the cap: a file of its own
    # the tensors keep the model's order: files in sequence hold increasing state-dict positions
    order = list(copy.state_dict())
    spans = [[order.index(k) for k in load_file(str(sharded / f))] for f in files]
    assert all(max(a) < min(b) for a, b in zip(spans, spans[1:]))

    x = torch.randn(7, 4, 8)
    a, b = load_pretrained(one), load_pretrained(sharded)
    assert torch.equal(a(x), b(x))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    # exporting the other layout into the same folder leaves nothing of the first behind
    export_native(m, sharded, dtype=torch.bfloat16)
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", "model.safetensors"]
    export_native(m, one, dtype=torch.bfloat16, max_file_gb=cap / 1e9)
    assert not (one / "model.safetensors").exists() and (one / INDEX_FILE).is_file()


def test_sharded_layout_errors(tmp_path):
    m = _trained_like()
    folder = export_native(m, tmp_path / "e", max_file_gb=2e-6)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names {shard.name}, which is missing"):
        load_pretrained(folder)
    with pytest.raises(ValueError, match="export_max_file_gb > 0"):
        StreamedExport(tmp_path / "z", [], {}, 0)
    (folder / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_pretrained(folder)
