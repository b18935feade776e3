"""Host reads of device values inside one non-logging Trainer step (on CUDA each waits for the GPU):
counted by ``helpers.count_host_syncs`` (``item`` / ``bool`` / ``int`` / ``float``, ``nonzero``,
``tolist``, ``cuda.synchronize``).

TopK in one process reads nothing back (the deferred finiteness check, exactly k slots a row laid
out without a ``nonzero``). The other activations still size their entry lists from the batch; their
counts are pinned at today's figures, so a new sync on their path fails too, and the sites are named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import count_host_syncs

from torchtitan_clt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "train_configs/debug_model.toml")
BASE = [
    "--config", DEBUG, "--training.device=cpu", "--data.source=synthetic", "--data.synthetic_n_layers=3",
    "--data.synthetic_d_model=16", "--model.features_per_layer=128", "--model.k=4", "--training.batch_size=64",
    "--training.steps=5", "--metrics.log_freq=100", "--checkpoint.enable=false", "--eval.enable=false",
    "--metrics.enable_tensorboard=false", "--optimizer.fused=true", "--training.nonfinite_check=deferred",
]  # fmt: skip
CASES = {
    # name: (overrides, host reads in one step today)
    "topk": (["--model.activation=topk", "--loss.sparsity=none"], 0),
    "topk_tanh": (["--model.activation=topk", "--loss.sparsity=tanh"], 0),
    # BatchTopK: the candidate blocks (nonzero), their count and the padded width (item), the
    # entry lists (nonzero, tolist)
    "batchtopk_layer": (["--model.activation=batchtopk"], 6),
    "batchtopk_all": (["--model.activation=batchtopk", "--model.batchtopk_scope=all"], 5),
    # JumpReLU: one nonzero per source layer (the active entries of the sparse decode)
    "jumprelu": (["--model.activation=jumprelu"], 3),
}


def _trainer(tmp_path, overrides):
    from torchtitan_clt.train import Trainer

    trainer = Trainer(load_config([*BASE, f"--job.dump_folder={tmp_path}", *overrides]))
    trainer.train_step(1, collect=True)  # first steps: lazy init, optimizer state
    trainer.train_step(2)
    return trainer


@pytest.mark.parametrize("case", list(CASES))
def test_host_reads_in_one_step(tmp_path, case):
    overrides, expected = CASES[case]
    trainer = _trainer(tmp_path, overrides)
    with count_host_syncs() as n:
        trainer.train_step(3)
    trainer.metrics.close()
    assert sum(n.calls.values()) == expected, n.calls


def test_a_planted_sync_is_counted(tmp_path, monkeypatch):
    """The counter sees a read the step did not have (here: the grad norm read as a float)."""
    from torchtitan_clt.trainer import step as step_mod

    trainer = _trainer(tmp_path, CASES["topk"][0])
    clip = step_mod.clip_grad_norm_

    def reading(*a, **kw):
        norm = clip(*a, **kw)
        float(norm)
        return norm

    monkeypatch.setattr(step_mod, "clip_grad_norm_", reading)
    with count_host_syncs() as n:
        trainer.train_step(3)
    trainer.metrics.close()
    assert n.calls == {"_local_scalar_dense": 1}, n.calls
    assert torch.isfinite(trainer.model.W_enc).all()
