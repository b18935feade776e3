"""CheckpointManager on tiny modules: complete/incomplete, retention, async, load_step, fresh start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from slow_commit import SLEEP_ENV
from torch import nn

from torchtitan_clt.checkpoint.manager import (
    CheckpointManager,
    ModelWrapper,
    OptimizerWrapper,
    RNGState,
    list_checkpoints,
)
from torchtitan_clt.config.job_config import JobConfig
from torchtitan_clt.config.manager import ConfigError


class Counter:
    """A Stateful holding python objects of changing shape (like a data source position)."""

    def __init__(self):
        self.pos = {"shard": 0, "offsets": [], "name": "x"}
        self.t = torch.zeros(3)

    def state_dict(self):
        return {"pos": dict(self.pos, offsets=list(self.pos["offsets"])), "t": self.t.clone()}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]
        self.t = sd["t"].clone()


def make(tmp_path, **ckpt):
    cfg = JobConfig()
    cfg.training.steps = 10
    cfg.checkpoint.interval = 2
    cfg.checkpoint.keep_latest_k = 0
    for k, v in ckpt.items():
        setattr(cfg.checkpoint, k, v)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = Counter()
    states = {
        "model": ModelWrapper(model),
        "optimizer": OptimizerWrapper(model, opt),
        "data": data,
        "rng": RNGState(),
    }
    return CheckpointManager(tmp_path, cfg, states), model, opt, data


def train_step(model, opt, data, step):
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    data.pos["shard"] = step
    data.pos["offsets"].append(step * 10)
    data.t += step
    return loss.item()


def snapshot(model, opt, data):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {
            i: {n: t.clone() for n, t in opt.state[p].items()}
            for i, p in enumerate(model.parameters())
            if p in opt.state
        },
        json.dumps(data.pos),
        data.t.clone(),
    )


def assert_same(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        for n in a[1][k]:
            assert torch.equal(a[1][k][n], b[1][k][n]), (k, n)
    assert a[2] == b[2]
    assert torch.equal(a[3], b[3])


def test_save_interval_and_load_latest(tmp_path):
    mgr, model, opt, data = make(tmp_path)
    snaps = {}
    for step in range(1, 8):
        train_step(model, opt, data, step)
        saved = mgr.save(step)
        assert saved == (step % 2 == 0)
        if saved:
            snaps[step] = snapshot(model, opt, data)
    assert mgr.save(7, force=True)
    snaps[7] = snapshot(model, opt, data)
    assert list_checkpoints(tmp_path / "checkpoints") == ([2, 4, 6, 7], [])
    meta = json.loads((tmp_path / "checkpoints/step-6/meta.json").read_text())
    assert meta["dcp_keys"] == ["model", "optimizer"] and meta["shared_keys"] == ["data", "rng"]
    rng_after_7 = torch.rand(4)

    mgr2, model2, opt2, data2 = make(tmp_path)
    assert not torch.equal(model2[0].weight, model[0].weight)
    assert mgr2.load() == 7
    assert_same(snaps[7], snapshot(model2, opt2, data2))
    # The RNG came back too: the next draw equals the one the first run made after step 7.
    assert torch.equal(torch.rand(4), rng_after_7)
    mgr3, model3, opt3, data3 = make(tmp_path, load_step=4)
    assert mgr3.load() == 4
    assert_same(snaps[4], snapshot(model3, opt3, data3))


def test_resumed_training_matches_uninterrupted(tmp_path):
    torch.manual_seed(1)
    mgr, model, opt, data = make(tmp_path / "a")
    losses = []
    for step in range(1, 7):
        torch.manual_seed(100 + step)
        losses.append(train_step(model, opt, data, step))
        mgr.save(step)
    mgr2, model2, opt2, data2 = make(tmp_path / "a", load_step=4)
    assert mgr2.load() == 4
    for step in (5, 6):
        torch.manual_seed(100 + step)
        assert train_step(model2, opt2, data2, step) == losses[step - 1]
    assert_same(snapshot(model, opt, data), snapshot(model2, opt2, data2))


def test_incomplete_checkpoints_are_skipped(tmp_path):
    mgr, model, opt, data = make(tmp_path)
    for step in range(1, 5):
        train_step(model, opt, data, step)
        mgr.save(step)
    good = snapshot(model, opt, data)
    folder = tmp_path / "checkpoints"
    (folder / "step-6.tmp").mkdir()  # killed while writing
    (folder / "step-6.tmp" / ".metadata").write_bytes(b"garbage")
    (folder / "step-8").mkdir()  # a folder without meta.json (half copied)
    assert list_checkpoints(folder) == ([2, 4], [6, 8])
    mgr2, model2, opt2, data2 = make(tmp_path)
    assert mgr2.load() == 4
    assert_same(good, snapshot(model2, opt2, data2))
    with pytest.raises(ConfigError, match="load_step=6"):
        make(tmp_path, load_step=6)[0].load()
    train_step(model2, opt2, data2, 6)
    mgr2.save(6)
    assert not (folder / "step-6.tmp").exists()
    assert list_checkpoints(folder)[0] == [2, 4, 6]


def test_keep_latest_k(tmp_path):
    mgr, model, opt, data = make(tmp_path, keep_latest_k=2)
    for step in range(1, 11):
        train_step(model, opt, data, step)
        mgr.save(step)
    assert list_checkpoints(tmp_path / "checkpoints") == ([8, 10], [])


def test_async_save(tmp_path):
    mgr, model, opt, data = make(tmp_path, async_mode="async", keep_latest_k=2)
    snaps = {}
    for step in range(1, 7):
        train_step(model, opt, data, step)
        if mgr.save(step):
            snaps[step] = snapshot(model, opt, data)
    mgr.close()
    assert list_checkpoints(tmp_path / "checkpoints") == ([4, 6], [])
    mgr2, model2, opt2, data2 = make(tmp_path)
    assert mgr2.load() == 6
    assert_same(snaps[6], snapshot(model2, opt2, data2))
    # The staged copy is what was saved, not the weights trained after save() returned.
    mgr3, model3, opt3, data3 = make(tmp_path, load_step=4)
    assert mgr3.load() == 4
    assert_same(snaps[4], snapshot(model3, opt3, data3))


def test_disabled_and_fresh_start(tmp_path):
    mgr, model, opt, data = make(tmp_path)
    train_step(model, opt, data, 2)
    mgr.save(2)
    off, *_ = make(tmp_path, enable=False)
    assert off.load() is None and not off.save(4, force=True)
    fresh, model2, *_ = make(tmp_path, fresh_start=True)
    w = model2[0].weight.clone()
    assert fresh.load() is None
    assert torch.equal(model2[0].weight, w)
    # The old checkpoints are moved aside (not deleted), so a later resume cannot pick them.
    assert list_checkpoints(tmp_path / "checkpoints") == ([], [])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.before_fresh_start")]
    assert len(aside) == 1 and (aside[0] / "step-2" / "meta.json").is_file()


def test_missing_state_refused(tmp_path):
    mgr, model, opt, data = make(tmp_path)
    mgr.save(2)
    mgr2, *_ = make(tmp_path)
    mgr2.states["extra"] = Counter()
    with pytest.raises(ConfigError, match="extra"):
        mgr2.load()


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path[:0] = [{tests!r}, {helpers!r}]
    import slow_commit  # commits sleep while its variable says so
    from test_checkpoint_manager import make, train_step
    from pathlib import Path
    mgr, model, opt, data = make(Path({run!r}))
    mgr.load()
    for step in range(1, 5):
        torch.manual_seed(step)
        train_step(model, opt, data, step)
        mgr.save(step)
        if step == 2:  # from now on every commit waits: a window to kill the process in
            import os
            os.environ[{env!r}] = "60"
    print("DONE", flush=True)
    """
)


def test_sigkill_during_save_resumes_from_previous(tmp_path):
    """A process killed (SIGKILL) while step 4 is being written: the next start loads step 2."""
    here = Path(__file__).parent
    script = SCRIPT.format(tests=str(here), helpers=str(here.parent), run=str(tmp_path), env=SLEEP_ENV)
    env = {k: v for k, v in os.environ.items() if k != SLEEP_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    folder = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (folder / "step-4.tmp" / ".metadata").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Every file of step 4 is written, but it was never marked complete.
    assert list_checkpoints(folder) == ([2], [4])
    ref, model_ref, opt_ref, data_ref = make(tmp_path / "ref")
    for step in (1, 2):
        torch.manual_seed(step)
        train_step(model_ref, opt_ref, data_ref, step)
    mgr, model, opt, data = make(tmp_path)
    assert mgr.load() == 2
    assert_same(snapshot(model_ref, opt_ref, data_ref), snapshot(model, opt, data))


def test_different_model_is_refused_with_a_message(tmp_path):
    from torchtitan_clt.protocols.registry import model_registry
    from torchtitan_clt.protocols.transcoder import TranscoderArgs

    def clt(F):
        args = TranscoderArgs(family="clt", n_layers=2, d_in=4, d_out=4, features_per_layer=F)
        m = model_registry.get("clt").build_fn(args)
        m.init_weights(0)
        return m

    cfg = make(tmp_path)[0].cfg
    job = JobConfig()
    job.checkpoint = cfg
    job.training.steps = 10
    CheckpointManager(tmp_path, job, {"model": ModelWrapper(clt(8))}).save(2)
    meta = json.loads((tmp_path / "checkpoints/step-2/meta.json").read_text())
    assert meta["model_args"]["features_per_layer"] == 8
    with pytest.raises(ConfigError, match="features_per_layer 8 .saved. vs 16"):
        CheckpointManager(tmp_path, job, {"model": ModelWrapper(clt(16))}).load()
    same = clt(8)
    CheckpointManager(tmp_path, job, {"model": ModelWrapper(same)}).load()


def test_rng_state_restores_its_own_and_the_older_trainer_layout():
    import random

    for layout in ("current", "older"):  # older: {"torch", "python"}, as the trainer's own class wrote
        torch.manual_seed(3)
        random.seed(3)
        sd = RNGState().state_dict()
        if layout == "older":
            sd = {"torch": sd["cpu"], "python": sd["python"]}
        want = (torch.rand(4), random.random())
        torch.manual_seed(99)
        random.seed(99)
        RNGState().load_state_dict(sd)
        got = (torch.rand(4), random.random())
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert got[1] == want[1]
