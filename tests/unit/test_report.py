"""The Evaluator end to end on a tiny LLM and text, and the report it feeds (eval.json + PNGs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from torchtitan_clt.config import JobConfig
from torchtitan_clt.metrics.eval import SpliceSpec, compute_baselines
from torchtitan_clt.metrics.evaluator import build_evaluator
from torchtitan_clt.metrics.logger import MetricsLogger
from torchtitan_clt.metrics.report import read_metrics, write_report
from torchtitan_clt.protocols import model_registry
from torchtitan_clt.protocols.transcoder import TranscoderArgs

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg(tmp_path: Path) -> JobConfig:
    cfg = JobConfig()
    cfg.job.dump_folder, cfg.job.name = str(tmp_path), "run"
    cfg.data.model_path = str(ASSETS / "tiny_llama")
    cfg.data.model_dtype = "float32"
    cfg.data.seq_len = 16
    cfg.eval.dataset = str(ASSETS / "tiny_text.txt")  # another dataset: all of it is held out
    cfg.eval.tokens = 64
    cfg.eval.batch_size = 2
    cfg.metrics.enable_tensorboard = False
    cfg.training.steps = 20
    return cfg


def _clt(layers, d=64, F=32):
    args = TranscoderArgs(
        family="clt",
        n_layers=len(layers),
        d_in=d,
        d_out=d,
        features_per_layer=F,
        activation="relu",
        layers=list(layers),
    )
    m = model_registry.get("clt").build_fn(args)
    m.init_weights(0)
    with torch.no_grad():
        m.b_enc.fill_(0.05)
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = _cfg(tmp)
    ev = build_evaluator(cfg, "cpu")
    folder = tmp / "run"
    log = MetricsLogger(folder, cfg)
    tc = _clt([0, 1, 2])
    g = torch.Generator().manual_seed(0)
    results = []
    for step in (10, 20):
        for s in range(step - 9, step + 1):  # training lines
            fvu = [0.9 / s + 0.01 * i for i in range(3)]
            log.log(
                s,
                {
                    "tokens": 64 * s,
                    "loss": 1.0 / s,
                    "terms": {"recon": 0.9 / s, "sparsity": 0.1 / s},
                    "fvu_per_layer": fvu,
                    "l0_per_layer": [5.0 + s / 10 + i for i in range(3)],
                },
            )
        res = ev.run(tc, step, open_loop=step == 20)  # the per-layer baselines come later
        log.log(step, ev.log_metrics(res))
        results.append(res)
        with torch.no_grad():
            for p in tc.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    log.close()
    return folder, ev, results


def test_evaluator_runs_and_logs(run):
    folder, ev, results = run
    assert all(b.shape == (2, 16) for b in ev.batches)
    assert sum(b.numel() for b in ev.batches) >= 64
    r = results[-1]["replacement"]
    assert r["tokens_scored"] == len(ev.batches) * 2 * 14
    assert len(r["open_loop"]["ce"]) == 3
    assert r["zero_ablation"]["ce_recovered_zero"] == 0.0
    fs = results[-1]["feature_stats"]
    assert fs["tokens"] == len(ev.batches) * 2 * 15  # BOS dropped
    assert len(fs["fvu_per_layer"]) == 3 and fs["l0"] > 0
    assert "open_loop" not in results[0]["replacement"]
    assert results[0]["replacement"]["zero_ablation"] == r["zero_ablation"]
    fresh = compute_baselines(
        ev.llm.model, ev.batches, SpliceSpec.of(_clt([0, 1, 2]), ev.llm.model), per_layer=True
    )
    assert r["open_loop"]["ce_zero_ablation"] == pytest.approx([z["ce"] for z in fresh.zero_per_layer])
    assert r["open_loop"]["ce_mean_ablation"] == pytest.approx([z["ce"] for z in fresh.mean_per_layer])
    assert r["zero_ablation"]["ce"] == pytest.approx(fresh.zero["ce"])
    evals = [rec for rec in read_metrics(folder) if "eval_kl" in rec]
    assert [rec["step"] for rec in evals] == [10, 20]
    assert evals[-1]["eval_kl"] == pytest.approx(r["closed_loop"]["kl"])
    assert evals[-1]["eval_fvu_per_layer"] == pytest.approx(fs["fvu_per_layer"])


def test_report_files(run):
    folder, ev, results = run
    res = results[-1]
    written = write_report(folder, res["replacement"], res["feature_stats"])
    expected = {
        "eval.json",
        "loss_fvu.png",
        "l0_per_layer.png",
        "density_histogram.png",
        "fvu_vs_l0.png",
        "ce_recovered_per_layer.png",
        "decoder_norm_by_offset.png",
    }
    assert set(written) == expected
    for name in expected - {"eval.json"}:
        data = (folder / "report" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    doc = json.loads((folder / "report" / "eval.json").read_text())
    h = doc["headline"]
    assert h["kl"] == pytest.approx(res["replacement"]["closed_loop"]["kl"])
    assert h["ce_recovered_zero"] == pytest.approx(res["replacement"]["closed_loop"]["ce_recovered_zero"])
    assert h["fvu"] == pytest.approx(res["feature_stats"]["fvu"])
    assert doc["training"]["logged_steps"] == 20 and doc["training"]["last"]["step"] == 20
    assert doc["replacement"]["layers"] == [0, 1, 2]


def test_report_without_eval_and_nan_to_null(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 2.0, "fvu": 0.5, "l0": 3.0, "fvu_per_layer": [0.5]})
        + "\n"
        + '{"step": 2, "loss"\n'  # a line cut short by a crash
    )
    stats = {"fvu": math.nan, "explained_variance": math.nan, "l0": 1.0, "dead_frac": 0.0, "dense_frac": 0.0}
    written = write_report(tmp_path, None, stats)
    assert set(written) == {"eval.json", "loss_fvu.png", "fvu_vs_l0.png"}
    doc = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert doc["headline"]["fvu"] is None and doc["replacement"] is None
    assert doc["evaluations"] == []
    history = [{"step": 3, "eval_fvu": 0.4, "eval_l0": 2.0}, {"step": 1, "eval_fvu": 0.6, "eval_l0": 3.0}]
    write_report(None, None, None, out_dir=tmp_path / "other", history=history)
    doc = json.loads((tmp_path / "other" / "eval.json").read_text())
    assert [e["step"] for e in doc["evaluations"]] == [1, 3]
    assert (tmp_path / "other" / "fvu_vs_l0.png").is_file()


def test_fvu_l0_plot_draws_the_quality_benchmark_rows(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from torchtitan_clt.metrics import report

    ref = tmp_path / "quality_reference.json"
    ref.write_text(
        json.dumps(
            {
                "recipe": "SmolLM2 L0-7",
                "rows": [
                    {"row": "topk_k16", "l0": 16.0, "fvu": 0.38},
                    {"row": "bad", "l0": None, "fvu": 0.5},
                ],
            }
        )
    )
    monkeypatch.setattr(report, "QUALITY_REFERENCE", ref)
    assert report.quality_reference() == [
        {"label": "topk_k16", "recipe": "SmolLM2 L0-7", "l0": 16.0, "fvu": 0.38}
    ]
    fig = Figure()
    train = [{"step": 1, "l0": 15.0, "fvu": 0.6}]
    assert report._plot_fvu_vs_l0(fig, train, [], report.quality_reference())
    ax = fig.axes[0]
    diamonds = [ln for ln in ax.get_lines() if ln.get_marker() == "D"]
    assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in diamonds] == [([16.0], [0.38])]
    assert any("topk_k16" in t.get_text() for t in ax.texts)
    # the shipped reference (package data) holds the benchmark's rows, each a finite FVU-L0 point
    monkeypatch.setattr(
        report, "QUALITY_REFERENCE", Path(report.__file__).with_name("quality_reference.json")
    )
    shipped = report.quality_reference()
    assert {r["label"] for r in shipped} >= {"topk_k16", "batchtopk_layer_k16"}


def _thirty_layers():
    L = 30
    train = [
        {"step": s, "loss": 100 / (s + 1), "fvu": 0.5,
         "fvu_per_layer": [0.3 + 0.01 * i + (0.9 if i == 11 else 0) for i in range(L)]}
        for s in range(0, 100, 10)
    ]  # fmt: skip
    edges = [-8 + 0.2 * i for i in range(41)]
    fs = {
        "tokens": 2048,
        "dense_threshold": 0.1,
        "density_hist": {
            "log10_edges": edges,
            "counts_per_layer": [[(i * b) % 7 if 20 < b < 38 else 0 for b in range(40)] for i in range(L)],
            "dead_per_layer": [1] * L,
        },
        "decoder_norm_by_offset": {
            "share": [[1 / (L - s) if o < L - s else float("nan") for o in range(L)] for s in range(L)],
            "per_offset": {k: [1 / (o + 1) for o in range(L)] for k in ("mean", "p10", "p50", "p90")}
            | {"offset": list(range(L))},
        },
    }
    return train, fs


def _draw(plot):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")  # as write_report draws them
    assert plot(fig)
    FigureCanvasAgg(fig).draw()  # lay out, so that text extents are final
    return fig


def test_thirty_layer_plots_read():
    """30 layers: per-layer FVU lines coloured by a layer colorbar with the layer above 1 named;
    the density histogram coloured by layer with its legend outside the axes; offset ticks that
    do not run together."""
    from torchtitan_clt.metrics import report

    train, fs = _thirty_layers()
    fig = _draw(lambda f: report._plot_loss_fvu(f, train, []))
    assert any(ax.get_ylabel() == "layer" for ax in fig.axes)  # the colorbar
    fvu_ax = fig.axes[1]
    assert [t.get_text() for t in fvu_ax.texts] == ["layer 11"]  # the one line above 1
    colors = {tuple(line.get_color()) for line in fvu_ax.lines[:30]}
    assert len(colors) == 30  # one colour per layer, none cycled

    fig = _draw(lambda f: report._plot_density(f, fs, None))
    ax = fig.axes[0]
    leg = ax.get_legend().get_window_extent()
    assert leg.x0 >= ax.get_window_extent().x1  # the legend is off the data
    assert len({tuple(p.get_edgecolor()) for p in ax.patches}) == 30

    fig = _draw(lambda f: report._plot_offsets(f, fs))
    for ax in fig.axes[:2]:  # the heatmap and the norms (the third is the colorbar)
        boxes = sorted(
            (t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0
        )
        assert 2 < len(boxes) <= 10
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))  # no two labels touch
