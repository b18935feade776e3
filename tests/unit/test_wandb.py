"""WandB logging in ``WANDB_MODE=offline``: the offline run folder holds each logged step's
scalars and per-layer charts, the resolved config and the report's plots, read back from wandb's
own transaction log (``tests/wandb_offline.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wandb_offline import offline_runs, read_run  # noqa: E402

from torchtitan_clt.config import ConfigError, load_config  # noqa: E402
from torchtitan_clt.metrics.logger import MetricsLogger  # noqa: E402
from torchtitan_clt.metrics.wandb_sink import agree_run_id, artifact_name, chart_values  # noqa: E402

pytest.importorskip("wandb")


def test_chart_names_follow_tensorboard():
    record = {
        "step": 7,
        "tokens": 512,
        "loss": 1.5,
        "loss_recon": 1.0,  # also in terms: logged once, as loss/recon
        "fvu": 0.25,
        "fvu_per_layer": [0.2, 0.3],
        "l0_per_layer": [4.0, 6.0],
        "eval_kl": 0.01,
        "flag": True,  # not a number to chart
    }
    got = chart_values(record, {"recon": 1.0, "sparsity": 0.5})
    assert got == {
        "train/tokens": 512,
        "loss/total": 1.5,
        "train/fvu": 0.25,
        "fvu_layer/00": 0.2,
        "fvu_layer/01": 0.3,
        "l0_layer/00": 4.0,
        "l0_layer/01": 6.0,
        "eval/kl": 0.01,
        "loss/recon": 1.0,
        "loss/sparsity": 0.5,
    }
    assert artifact_name("clt 8b/run#3") == "clt-8b-run-3-model"


def test_run_id_is_made_once_and_kept():
    new = agree_run_id("")
    assert len(new) == 8 and new.isalnum() and agree_run_id("") != new
    assert agree_run_id("abc123") == "abc123"


def test_missing_wandb_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = load_config(["--data.source=synthetic", "--metrics.wandb=true"])
    with pytest.raises(ConfigError, match=r"pip install 'torchtitan_clt\[wandb\]'"):
        MetricsLogger(tmp_path, cfg, 0, wandb_run_id="x")
    # other ranks never import it
    MetricsLogger(tmp_path, cfg, 1, wandb_run_id="x").close()


def test_offline_run_holds_scalars_config_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        [
            "--data.source=synthetic",
            "--job.name=wb",
            "--metrics.wandb=true",
            "--metrics.wandb_tags=[clt,unit]",
            "--metrics.enable_tensorboard=false",
            "--model.k=7",
        ]
    )
    log = MetricsLogger(tmp_path, cfg, 0, wandb_run_id="unit0001")
    for step in (1, 2, 3):
        log.log(
            step,
            {
                "tokens": 64 * step,
                "loss": 1.0 / step,
                "terms": {"recon": 0.5 / step},
                "fvu_per_layer": [0.1 * step, 0.2 * step],
                "l0_per_layer": [3.0, 5.0],
                "lr": 1e-3,
            },
        )
    from PIL import Image

    (tmp_path / "report").mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "report" / "loss_fvu.png")
    log.log_report()
    log.close()

    (folder,) = offline_runs(tmp_path)
    run = read_run(folder)
    assert run["id"] == "unit0001" and run["name"] == "wb" and run["tags"] == ["clt", "unit"]
    assert run["config"]["model"]["k"] == 7 and run["config"]["metrics"]["wandb"] is True
    hist = run["history"]
    assert sorted(hist) == [1, 2, 3]
    for step in (1, 2, 3):
        row = hist[step]
        assert row["loss/total"] == pytest.approx(1.0 / step)
        assert row["loss/recon"] == pytest.approx(0.5 / step)
        assert row["train/tokens"] == 64 * step
        assert row["fvu_layer/01"] == pytest.approx(0.2 * step)
        assert row["l0_layer/00"] == 3.0
        assert row["train/fvu"] == pytest.approx(0.15 * step)  # the logger's mean over layers
    image = hist[3]
    assert image["report/loss_fvu/_type"] == "image-file"
    assert (image["report/loss_fvu/width"], image["report/loss_fvu/height"]) == (8, 6)
    assert (folder / "files" / image["report/loss_fvu/path"]).is_file()
