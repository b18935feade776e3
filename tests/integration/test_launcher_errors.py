"""Every launcher path gives one line and exit code 2 for a bad config or input, never a traceback:
``run_train.sh`` on one process, on two, and as two "nodes"; the scripts with ``--config FILE``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEBUG = "train_configs/debug_model.toml"


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)


def _launch(tmp_path, *args, **env):
    cmd = ["./run_train.sh", "--config", DEBUG, f"--job.dump_folder={tmp_path}", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _done(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _assert_one_message(text: str, needle: str) -> None:
    assert needle in text, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]


def test_bad_field_stops_before_torchrun_starts(tmp_path):
    t0 = time.perf_counter()
    rc, text = _done(_launch(tmp_path, "--model.features=3"))
    took = time.perf_counter() - t0
    assert rc == 2
    _assert_one_message(text, "Unknown field in [model] 'features'. Did you mean 'features_per_layer'?")
    assert text.count("\n") == 1  # that line and nothing else: no worker was started
    print(f"config check: {took:.2f} s")


def test_worker_side_error_on_two_processes_is_one_line(tmp_path):
    # A family name that a user module could register is checked in the worker (it needs the
    # registry): still one line, exit 2.
    rc, text = _done(_launch(tmp_path, "--model.name=nosuch", "--job.custom_import=json", NGPU="2"))
    assert rc == 2
    _assert_one_message(text, "model.name = 'nosuch' is not a registered model family")


def test_two_nodes_both_exit_2_without_traceback(tmp_path):
    port = str(free_port())
    procs = [
        _launch(tmp_path, "--data.dataset=/no/such/file.txt", NGPU="1", NNODES="2", NODE_RANK=str(r),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=f"t{port}")
        for r in range(2)
    ]  # fmt: skip
    results = [_done(p) for p in procs]
    assert [rc for rc, _ in results] == [2, 2], results
    for _, text in results:
        assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    assert "data.dataset = '/no/such/file.txt': no such file or folder" in results[0][1]


@pytest.mark.parametrize(
    "script, args",
    [
        ("scripts/estimate_memory.py", ["--config", DEBUG, "--modle.k=3"]),
        ("scripts/cache_activations.py", ["--config", DEBUG, "--modle.k=3", "--out", "{tmp}/cache"]),
    ],
)
def test_scripts_take_config_and_stop_with_one_line(tmp_path, script, args):
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    _assert_one_message(r.stdout + r.stderr, "Unknown config section 'modle'")


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("scripts/eval_conversion.py", ["{tmp}/nope"], "is neither a checkpoint"),
        ("scripts/prepare_model.py", ["{tmp}/nope"], "no such folder"),
    ],
)
def test_scripts_name_a_missing_input(tmp_path, script, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    _assert_one_message(r.stdout + r.stderr, needle)


DEMO = "train_configs/demo_smollm2_clt.toml"
CHECK = (
    "import sys, time; t = time.perf_counter(); from torchtitan_clt.config.check import main; rc = main(sys.argv[1:]); "
    "print(f'{time.perf_counter() - t:.3f} torch={\"torch\" in sys.modules}'); sys.exit(rc)"
)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data.dataset=/no/such/file.txt"], "data.dataset = '/no/such/file.txt': no such file or folder"),
        (
            ["--eval.dataset=./no/such/*.jsonl"],
            "eval.dataset = './no/such/*.jsonl': the glob matches no file",
        ),
        (["--data.layers=[0,40]"], "has 30 layers (0-29, from its config), so [40] do not exist"),
        (
            ["--model.activation=TopK"],
            "model.activation = 'TopK' is not a built-in name. Did you mean 'topk'? (names",
        ),
        (["--model.activation=batchtop"], "Did you mean 'batchtopk'?"),
        (["--data.source=Synthetic"], "Did you mean 'synthetic'?"),
        (
            ["--data.source=synthetic", "--data.synthetic_d_model=768"],
            "data.source = 'synthetic' trains a dictionary of 4 layers of width 768, but eval.enable",
        ),
        (
            ["--eval.feature_skip_positions=127"],
            "eval.feature_skip_positions = 127 must be in [0, data.seq_len - 1",
        ),
    ],
)
def test_first_run_inputs_refused_before_any_work(tmp_path, args, needle):
    """The demo config with one bad input: one line, exit 2, from files alone (the layer count is
    the GGUF file's header or its cached conversion's config.json; torch is never imported)."""
    r = subprocess.run(
        [sys.executable, "-c", CHECK, "--config", DEMO, *args],
        cwd=ROOT, env=_env(TCLT_CACHE=str(tmp_path)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    took, torch_loaded = r.stdout.split()
    assert torch_loaded == "torch=False"
    assert float(took) < 2.0, took  # measured 0.1-0.4 s in process on a loaded 2-core machine


def test_good_configs_pass_the_check():
    for cfg in sorted((ROOT / "train_configs").glob("*.toml")):
        r = subprocess.run([sys.executable, "-m", "torchtitan_clt.config.check", "--config", str(cfg)],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, (cfg, r.stderr)


def test_builtin_names_are_the_registries():
    # A fresh process: other tests register their own families into this one's registries.
    code = (
        "from torchtitan_clt.config.check import BUILTIN_NAMES\n"
        "from torchtitan_clt.protocols import activation_registry, data_source_registry, model_registry\n"
        "for field, reg in [('model.name', model_registry), ('model.activation', activation_registry),\n"
        "                   ('data.source', data_source_registry)]:\n"
        "    assert sorted(BUILTIN_NAMES[field]) == reg.names(), (field, BUILTIN_NAMES[field], reg.names())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


def _finished_run(root: Path, steps: int = 20) -> Path:
    """A run folder as a finished run leaves it: the last checkpoint at ``steps``, then the report,
    export and feature examples written after it."""
    run = root / "done"
    ckpt = run / "checkpoints" / f"step-{steps}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(f'{{"step": {steps}}}')
    (ckpt / ".metadata").write_text("")
    old = time.time() - 100
    os.utime(ckpt / "meta.json", (old, old))
    for f in ("report/eval.json", "export/config.json", "features/summary.json"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("{}")
    return run


def test_finished_run_says_so_and_exits_0_without_rewriting(tmp_path):
    run = _finished_run(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    args = [f"--job.dump_folder={tmp_path}", "--job.name=done", "--training.steps=20"]
    t0 = time.perf_counter()
    r = subprocess.run(["./run_train.sh", "--config", DEBUG, *args], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        r.stdout.strip().splitlines()
        == [
            f"{run} is complete (step 20 of 20): its report, exports and feature examples are there. Nothing to "
            "do; raise --training.steps to train on, or start over with --checkpoint.fresh_start=true."
        ]
        and r.stderr == ""
    )
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing rewritten
    assert time.perf_counter() - t0 < 5
    # Not complete, so the launch goes on (the check alone: exit 0, silent): more steps asked, a
    # fresh start, or an end of run that did not finish (the report older than the checkpoint).
    check = [sys.executable, "-m", "torchtitan_clt.prelaunch", "--config", DEBUG, *args]
    for extra in (["--training.steps=30"], ["--checkpoint.fresh_start=true"]):
        r = subprocess.run(check + extra, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), extra
    old = time.time() - 1000
    os.utime(run / "report" / "eval.json", (old, old))
    r = subprocess.run(check, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "")


def test_export_saelens_of_a_clt_refused_before_loading(tmp_path):
    """From the checkpoint's meta.json: one line, exit 2, before torch, the model or the LLM."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-10"
    ckpt.mkdir(parents=True)
    (run / "config.toml").write_text((ROOT / DEMO).read_text())
    (ckpt / "meta.json").write_text(
        '{"step": 10, "model_args": {"family": "clt", "activation": "batchtopk"}}'
    )
    (ckpt / ".metadata").write_text("")  # a stand-in: loading it would fail, so the refusal came first
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "scripts/export.py", str(run), "--format", "saelens"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    took = time.perf_counter() - t0
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--format saelens: model.name='clt' is a crosslayer transcoder" in err[0], err
    assert took < 2.0, took
