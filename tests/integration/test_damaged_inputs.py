"""Damaged or mismatched inputs through the CLI entry point (``torchtitan_clt.train.main``): each
stops with one message naming the path and what to do (exit 2, or 3 for non-finite data), and
the last good state still loads. A damaged checkpoint falls back to the previous complete one and
the run continues exactly as if it had resumed from that one; a full disk during a save leaves
the previous checkpoint intact."""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem

import torchtitan_clt
from torchtitan_clt.checkpoint.manager import list_checkpoints
from torchtitan_clt.checkpoint.offline import load_model_from_checkpoint
from torchtitan_clt.config import load_config
from torchtitan_clt.train import Trainer, TrainingError, main

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "train_configs/debug_model.toml")
CUSTOM = str(Path(__file__).with_name("custom_family.py"))
SYNTH = [
    "--training.steps=10", "--training.device=cpu", "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
    "--checkpoint.interval=5", "--checkpoint.keep_latest_k=0", "--checkpoint.export=false", "--eval.enable=false",
    "--lr_scheduler.warmup_steps=2", "--data.source=synthetic", "--data.synthetic_n_layers=3",
    "--data.synthetic_d_model=16", "--model.features_per_layer=32", "--training.batch_size=64",
    "--standardize.inputs=per_dim", "--standardize.targets=scalar", "--standardize.estimate_tokens=128",
]  # fmt: skip


def run(tmp_path, *extra, name="run"):
    return main(["--config", DEBUG, f"--job.dump_folder={tmp_path}", f"--job.name={name}", *SYNTH, *extra])


def loss_rows(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 5 and 10, the loss of every step."""
    tmp = tmp_path_factory.mktemp("reference")
    assert run(tmp) == 0
    return tmp / "run"


def _copy_run(reference: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(reference, dst)
    return dst


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda ck: _truncate(ck / "__0_0.distcp"), "__0_0.distcp has"),
        (lambda ck: _flip_byte(ck / "states/data.pt"), "states/data.pt does not match its checksum"),
        (lambda ck: (ck / "files.json").unlink() or _truncate(ck / "__0_0.distcp"), "do not load"),
    ],
    ids=["truncated_shard", "corrupted_state", "truncated_shard_no_manifest"],
)
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, caplog, damage, needle):
    run_dir = _copy_run(reference, tmp_path)
    damage(run_dir / "checkpoints/step-10")
    assert run(tmp_path) == 0
    assert "checkpoints/step-10 is damaged" in caplog.text and needle in caplog.text, caplog.text
    assert "falling back to step 5" in caplog.text and "Resumed from step 5" in caplog.text
    # Steps 6..10 trained again (the log keeps one row per step), with the uninterrupted run's losses.
    assert loss_rows(run_dir) == loss_rows(reference)
    # The damaged step 10 was replaced by the new save: it loads to the reference weights.
    a, _ = load_model_from_checkpoint(run_dir, 10)
    b, _ = load_model_from_checkpoint(reference, 10)
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k


def test_damaged_checkpoint_named_by_load_step_stops(tmp_path, reference, caplog):
    run_dir = _copy_run(reference, tmp_path)
    _truncate(run_dir / "checkpoints/step-10/__0_0.distcp")
    assert run(tmp_path, "--checkpoint.load_step=10") == 2
    assert (
        "checkpoint.load_step=10) is damaged" in caplog.text
        and "Pick another step (complete: [5, 10])" in caplog.text
    )
    assert load_model_from_checkpoint(run_dir, 5)[1]["step"] == 5  # the good one still loads


@contextmanager
def _disk_full_while_writing(marker: str, after_bytes: int = 1000):
    """Every file DCP opens under a path containing ``marker`` fails with ENOSPC after a few bytes."""
    original = filesystem.FileSystem.create_stream

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

    @contextmanager
    def create_stream(self, path, mode):
        with original(self, path, mode) as f:
            yield Full(f) if marker in str(path) and "w" in mode else f

    filesystem.FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        filesystem.FileSystem.create_stream = original


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, reference, caplog):
    with _disk_full_while_writing("step-10.tmp"):
        assert run(tmp_path) == 2
    assert "writing step 10" in caplog.text and "No space left on device" in caplog.text
    assert "the previous checkpoint (step 5) is intact" in caplog.text
    run_dir = tmp_path / "run"
    assert list_checkpoints(run_dir / "checkpoints") == ([5], [])  # the partial folder is gone
    model, meta = load_model_from_checkpoint(run_dir, 5)
    ref, _ = load_model_from_checkpoint(reference, 5)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # With space again, the same command resumes from step 5 and ends like the uninterrupted run.
    assert run(tmp_path) == 0
    assert "Resumed from step 5" in caplog.text
    assert loss_rows(run_dir) == loss_rows(reference)


def test_nan_activations_stop_before_the_optimizer_step(tmp_path, caplog):
    args = [
        "--config", DEBUG, f"--job.dump_folder={tmp_path}", f"--job.custom_import={CUSTOM}", "--data.source=toy_nan",
        "--standardize.inputs=none", "--standardize.targets=none", "--training.steps=10", "--checkpoint.interval=1",
        "--checkpoint.export=false", "--eval.enable=false",
    ]  # fmt: skip
    assert main(args) == 3
    # custom_family's toy_nan: every target is NaN from the 4th batch (256 rows × 16 dims per layer).
    assert (
        "Non-finite activations at step 4: targets (mlp_out) at layer 0 (4096 NaN, 0 inf), layer 1"
        in caplog.text
    )
    assert "The optimizer did not take step 4" in caplog.text
    # In process: the weights after the failed step are those of the step-3 checkpoint.
    trainer = Trainer(load_config([*args, "--job.name=again", "--checkpoint.enable=false"]))
    with pytest.raises(TrainingError, match="step 4"):
        trainer.train()
    saved, meta = load_model_from_checkpoint(tmp_path / "debug_model")
    assert meta["step"] == 3
    for k, v in saved.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    trainer.metrics.close()


def test_nan_found_without_a_host_sync_skips_the_update_and_stops_before_writing(tmp_path, caplog):
    """``training.nonfinite_check = "deferred"``: step 4's NaN targets are read on the host two
    steps later (at step 6), its update (and step 5's, NaN too) skipped by the fused optimizer on
    the device; nothing from step 4 on is written."""
    args = [
        "--config", DEBUG, f"--job.dump_folder={tmp_path}", f"--job.custom_import={CUSTOM}", "--data.source=toy_nan",
        "--standardize.inputs=none", "--standardize.targets=none", "--training.steps=10", "--checkpoint.interval=3",
        "--checkpoint.export=false", "--eval.enable=false", "--metrics.log_freq=100", "--optimizer.fused=true",
    ]  # fmt: skip
    assert main([*args, "--training.nonfinite_check=deferred"]) == 3
    assert (
        "Non-finite activations at step 4: targets (mlp_out) at layers 0, 1. The optimizer skipped "
        "step 4's update on the device; training stopped at step 6, before writing anything from it "
        "(the last checkpoint is step 3)" in caplog.text
    )
    assert list_checkpoints(tmp_path / "debug_model" / "checkpoints")[0] == [3]
    saved, _ = load_model_from_checkpoint(tmp_path / "debug_model")
    # The same run checked every step: step 3's weights are the same (the modes differ only in NaN).
    assert main([*args, "--job.name=every_step", "--training.nonfinite_check=every_step"]) == 3
    every, _ = load_model_from_checkpoint(tmp_path / "every_step", 3)
    for k, v in every.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    # In process: steps 4 and 5 ran, but the weights and AdamW's state are those of step 3.
    again = [*args, "--training.nonfinite_check=deferred", "--job.name=again", "--checkpoint.enable=false"]
    trainer = Trainer(load_config(again))
    with pytest.raises(TrainingError, match="at step 4"):
        trainer.train()
    assert trainer.train_state.step == 6
    for k, v in saved.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    for opt in trainer.optimizers:
        assert {float(st["step"]) for st in opt.state.values()} == {3.0}
    trainer.metrics.close()


def test_deferred_check_drops_the_steps_host_syncs(tmp_path):
    """A non-logging step with ``deferred`` makes one host read fewer than with ``every_step``
    (the loss check between forward and backward), and still trains the same step."""
    from helpers import count_host_syncs

    losses, syncs = {}, {}
    for how in ("every_step", "deferred"):
        cfg = load_config(
            [
                "--config", DEBUG, f"--job.dump_folder={tmp_path}", f"--job.name={how}", *SYNTH,
                "--training.steps=4", "--metrics.log_freq=100", "--checkpoint.enable=false",
                "--eval.enable=false", "--optimizer.fused=true", f"--training.nonfinite_check={how}",
            ]
        )  # fmt: skip
        trainer = Trainer(cfg)
        trainer.train_step(1, collect=True)
        with count_host_syncs() as n:
            stats = trainer.train_step(2)
        syncs[how], losses[how] = n.calls, float(stats.loss)
        trainer.metrics.close()
    assert (trainer.step_fn.guard is not None) and losses["deferred"] == losses["every_step"]
    assert sum(syncs["every_step"].values()) - sum(syncs["deferred"].values()) == 1, syncs


def test_export_missing_a_tensor_or_with_wrong_shapes(tmp_path, reference):
    from safetensors.torch import load_file, save_file

    from torchtitan_clt.checkpoint.export import export_native
    from torchtitan_clt.config import InputError

    model, _ = load_model_from_checkpoint(reference, 10)
    good = export_native(model, tmp_path / "export")
    tensors = load_file(str(good / "model.safetensors"))
    for case, edit, needle in [
        ("missing", lambda t: t.pop("b_enc"), "missing b_enc"),
        ("shape", lambda t: t.update(W_enc=t["W_enc"][..., :-1].clone()), "wrong shapes: W_enc"),
    ]:
        bad = tmp_path / case
        shutil.copytree(good, bad)
        t = dict(tensors)
        edit(t)
        save_file(t, str(bad / "model.safetensors"))
        with pytest.raises(InputError, match=needle) as e:
            torchtitan_clt.load_pretrained(bad)
        assert str(bad / "model.safetensors") in str(e.value) and "export it again" in str(e.value)
    torchtitan_clt.load_pretrained(good)  # the good one still loads


@pytest.mark.parametrize(
    "dataset, needle",
    [("{tmp}/nothing_*.txt", "the glob matches no file"), ("{tmp}/empty", "every matching file is empty")],
)
def test_dataset_that_matches_nothing_or_only_empty_files(tmp_path, caplog, dataset, needle):
    (tmp_path / "empty").mkdir()
    for i in range(2):
        (tmp_path / "empty" / f"part{i}.txt").write_text("")
    rc = main(
        ["--config", DEBUG, f"--job.dump_folder={tmp_path}", f"--data.dataset={dataset.format(tmp=tmp_path)}"]
    )
    assert rc == 2
    assert needle in caplog.text and "Traceback" not in caplog.text


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from torchtitan_clt.data import write_activation_cache

    folder = tmp_path_factory.mktemp("cache") / "cache"
    write_activation_cache(load_config(["--config", DEBUG]), folder, 1200, 600, "float32")
    return folder


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--data.model_path=tests/assets/tiny_qwen2", "but the cache in {cache} was written from"),
        ("--data.hook_in=mlp_in", "data.hook_in = 'mlp_in' but the cache in {cache} holds 'resid_mid'"),
        ("--data.layers=0,5", "layers [5] are not in the cache in {cache}"),
    ],
    ids=["other_model", "other_hook", "other_layers"],
)
def test_cache_from_another_model_hook_or_layers(tmp_path, small_cache, caplog, override, needle):
    cache = ["--data.source=cache", f"--data.cache_dir={small_cache}", "--training.steps=3", "--eval.enable=false",
             "--checkpoint.enable=false", "--checkpoint.export=false", "--standardize.estimate_tokens=256"]  # fmt: skip
    assert main(["--config", DEBUG, f"--job.dump_folder={tmp_path}", *cache, override]) == 2
    assert needle.format(cache=small_cache) in caplog.text, caplog.text[-2000:]
    assert (
        main(["--config", DEBUG, f"--job.dump_folder={tmp_path}", "--job.name=good", *cache]) == 0
    )  # still trains
