"""The Hugging Face Hub without a network: snapshots laid out in a temporary cache exactly as
huggingface_hub writes them, read through the real ``snapshot_download`` with HF_HUB_OFFLINE=1;
the push script's planned commit (files, model card) checked with ``HfApi`` mocked; the errors."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import tiny_model

from torchtitan_clt.checkpoint import hub
from torchtitan_clt.checkpoint.circuit_tracer import export_circuit_tracer
from torchtitan_clt.checkpoint.export import export_native
from torchtitan_clt.checkpoint.hub import HubError, HubRef, parse_hub_ref, plan_upload, push_run
from torchtitan_clt.checkpoint.saelens import export_saelens

ROOT = Path(__file__).resolve().parents[2]
REPO = "org/tiny-plt"
C1, C2 = "a" * 40, "b" * 40  # commits: main, and the tag v1


def write_hf_cache(
    cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...]
) -> None:
    """What huggingface_hub leaves after a download: ``blobs/<etag>`` (sha256 for LFS files,
    the git blob sha1 otherwise), ``snapshots/<commit>/<path>`` relative symlinks to them, and
    ``refs/<name>`` holding the commit hash (no newline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path, data in files.items():
        if path.endswith(".safetensors"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def make_run(run: Path, seed: int = 0, eval_json: bool = True) -> torch.nn.Module:
    """A run folder as training leaves it: export/, circuit_tracer/, saelens/, report/, config."""
    m = tiny_model("plt", "jumprelu", L=3, d=8, F=16, layers=[0, 1, 2], model_name="org/llm", seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 9)))
    export_native(m, run / "export", extra_meta={"step": 40})
    export_circuit_tracer(m, run / "circuit_tracer")
    export_saelens(m, run / "saelens")
    (run / "config.toml").write_text('[job]\nname = "tiny"\ndescription = "PLT, JumpReLU, tiny test"\n')
    lines = [{"step": s, "tokens": 256 * s, "loss": 1.0 / s, "fvu": 0.5, "l0": 9.0} for s in (20, 40)]
    lines.append({"step": 40, "eval_fvu": 0.3141, "eval_l0": 7.25, "eval_fvu_per_layer": [0.2, 0.3, 0.4]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "report").mkdir()
    (run / "report" / "loss_fvu.png").write_bytes(b"\x89PNG fake")
    if eval_json:
        doc = {
            "headline": {
                "fvu": 0.1234,
                "l0": 12.5,
                "dead_frac": 0.25,
                "ce_recovered_zero": 0.876,
                "tokens_scored": 4096,
            },
            "feature_stats": {"fvu_per_layer": [0.11, 0.12, 0.13], "l0_per_layer": [11.0, 12.0, 13.0]},
        }
        (run / "report" / "eval.json").write_text(json.dumps(doc))
    (run / "checkpoints" / "step-40").mkdir(parents=True)
    (run / "checkpoints" / "step-40" / "big.distcp").write_bytes(b"x")
    return m.eval()


def test_parse_hub_ref():
    assert parse_hub_ref("org/name") == HubRef("org/name")
    assert parse_hub_ref("org/name@v1.2") == HubRef("org/name", "v1.2")
    assert parse_hub_ref("org/name@refs/pr/3") == HubRef("org/name", "refs/pr/3")
    assert parse_hub_ref("hf://org/name") == HubRef("org/name")
    assert parse_hub_ref("hf://org/name/circuit_tracer") == HubRef("org/name", None, "circuit_tracer")
    assert parse_hub_ref("hf://org/name@dev/a/b/") == HubRef("org/name", "dev", "a/b")
    for local in ("/abs/path", "./x", "one", "a/b/c", Path("org/name")):
        assert parse_hub_ref(local) is None
    with pytest.raises(ValueError, match="not a Hub reference"):
        parse_hub_ref("hf://just-a-name")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        parse_hub_ref("hf://org/name/../x")


def test_offline_load_through_snapshot_download(tmp_path):
    """A fresh interpreter with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set: the real snapshot_download
    resolves refs/main, a tag, a commit and a subfolder from the cache laid out above."""
    m1, m2 = make_run(tmp_path / "run1", seed=0), make_run(tmp_path / "run2", seed=1)
    cache = tmp_path / "cache"
    for run, commit, refs in ((tmp_path / "run1", C1, ("main",)), (tmp_path / "run2", C2, ("v1",))):
        files = {f.path_in_repo: f.content or f.source.read_bytes() for f in plan_upload(run, REPO)}
        write_hf_cache(cache, REPO, commit, files, refs)
    x = torch.randn(16, 3, 8) * 2
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch, huggingface_hub.constants as c
        assert c.HF_HUB_OFFLINE, "HF_HUB_OFFLINE not seen"
        import torchtitan_clt
        from torchtitan_clt.checkpoint.hub import resolve_pretrained
        x = torch.load({str(tmp_path / "x.pt")!r})
        out, paths, errors = {{}}, {{}}, {{}}
        for name in ["{REPO}", "{REPO}@v1", "{REPO}@{C1}", "hf://{REPO}/circuit_tracer", "hf://{REPO}@v1/circuit_tracer"]:
            paths[name] = str(resolve_pretrained(name))
            with torch.no_grad():
                out[name] = torchtitan_clt.load_pretrained(name)(x)
        for name in ["org/not-cached", "hf://{REPO}/nope", "{REPO}@v9"]:
            try:
                torchtitan_clt.load_pretrained(name)
            except FileNotFoundError as e:
                errors[name] = str(e)
        torch.save(out, {str(tmp_path / "out.pt")!r})
        print(json.dumps({{"paths": paths, "errors": errors}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert res["paths"][REPO] == str(snap / C1)
    assert res["paths"][f"{REPO}@v1"] == str(snap / C2)
    assert res["paths"][f"hf://{REPO}/circuit_tracer"] == str(snap / C1 / "circuit_tracer")
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        want1, want2 = m1(x), m2(x)
    torch.testing.assert_close(out[REPO], want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[f"{REPO}@{C1}"], want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[f"{REPO}@v1"], want2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[f"hf://{REPO}/circuit_tracer"], want1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[f"hf://{REPO}@v1/circuit_tracer"], want2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want1, want2)
    err = res["errors"]
    assert (
        "HF_HUB_OFFLINE is set" in err["org/not-cached"]
        and "huggingface-cli download org/not-cached" in err["org/not-cached"]
    )
    assert (
        "cached snapshot (HF_HUB_OFFLINE is set) has no folder 'nope'" in err[f"hf://{REPO}/nope"]
        and "circuit_tracer" in err[f"hf://{REPO}/nope"]
    )
    assert "--revision v9" in err[f"{REPO}@v9"]


def test_local_folder_wins_over_hub_name(tmp_path, monkeypatch):
    model = tiny_model("plt", "relu", L=2, d=4, F=6)
    export_native(model, tmp_path / REPO)
    monkeypatch.chdir(tmp_path)

    def no_network(*a, **k):
        raise AssertionError("snapshot_download called for a local folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert hub.resolve_pretrained(REPO) == Path(REPO)
    with pytest.raises(FileNotFoundError, match="not a folder.*Hub repo"):
        hub.resolve_pretrained(str(tmp_path / "missing"))


class FakeApi:
    """Records the HfApi calls push_run makes; sends nothing."""

    calls: list = []

    def __init__(self, token=None, library_name=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        FakeApi.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        FakeApi.calls.append(("create_commit", repo_id, list(operations), revision))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{C1}",
            commit_message=commit_message,
            commit_description="",
            oid=C1,
        )


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeApi


def test_push_is_one_commit_of_the_planned_files(tmp_path, fake_api):
    run = tmp_path / "run"
    make_run(run)
    url = push_run(run, REPO, private=True, revision="dev")
    assert url.endswith(f"/commit/{C1}")
    kinds = [c[0] for c in fake_api.calls]
    assert kinds == ["init", "create_repo", "create_branch", "create_commit"]  # one commit, nothing else
    assert fake_api.calls[0][1] == "hf_test_token" and fake_api.calls[1] == ("create_repo", REPO, True, True)
    _, _, ops, revision = fake_api.calls[3]
    assert revision == "dev"
    paths = {op.path_in_repo: op for op in ops}
    expected = {"config.json", "model.safetensors", "README.md", "training_config.toml"}
    expected |= {f"report/{n}" for n in ("eval.json", "loss_fvu.png")}
    expected |= {"circuit_tracer/config.yaml"} | {f"circuit_tracer/layer_{i}.safetensors" for i in range(3)}
    expected |= {f"saelens/layer_{i}/{n}" for i in range(3) for n in ("cfg.json", "sae_weights.safetensors")}
    assert set(paths) == expected  # no checkpoints, logs or TensorBoard files
    assert paths["model.safetensors"].path_or_fileobj == str(run / "export" / "model.safetensors")
    card = paths["README.md"].path_or_fileobj.decode()
    for text in (
        "library_name: torchtitan_clt",
        "base_model: org/llm",
        "per-layer transcoder",
        "`resid_mid` → `mlp_out`",
        "| layers | 0, 1, 2 |",
        "40 steps, 10,240 tokens",
        "report/eval.json, 4,096 held-out tokens",
        "| FVU (fraction of variance unexplained) | 0.1234 |",
        "| CE recovered (vs zero ablation) | 87.6% |",
        "| dead features | 25.0% |",
        "| 2 | 0.1300 | 13.0 |",
        "![Loss and FVU during training](report/loss_fvu.png)",
        f'torchtitan_clt.load_pretrained("{REPO}")',
        f'ReplacementModel.from_pretrained("org/llm", "{REPO}/circuit_tracer"',
        'Transcoder.load_from_disk(f"{path}/saelens/layer_0")',
    ):
        assert text in card, text


def test_features_folder_is_uploaded(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    (run / "features" / "data").mkdir(parents=True)
    for name in ("17.json", "index.html", "data/L0_F3.js"):
        (run / "features" / name).write_text("{}")
    paths = {f.path_in_repo for f in plan_upload(run, REPO)}
    assert {"features/17.json", "features/index.html", "features/data/L0_F3.js"} <= paths


def test_card_falls_back_to_logged_evaluation(tmp_path):
    run = tmp_path / "run"
    make_run(run, eval_json=False)
    card = plan_upload(run, REPO)[-1].content.decode()
    assert (
        "metrics.jsonl, evaluation at step 40" in card
        and "| FVU (fraction of variance unexplained) | 0.3141 |" in card
    )
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 2.0, "fvu": 0.61, "l0": 3.0}) + "\n")
    card = plan_upload(run, REPO)[-1].content.decode()
    assert "no held-out evaluation" in card and "FVU 0.6100" in card and "not held out" in card


def test_dry_run_prints_the_commit_and_sends_nothing(tmp_path, fake_api, capsys):
    run = tmp_path / "run"
    make_run(run)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import push_to_hub
    finally:
        sys.path.pop(0)
    assert push_to_hub.main([str(run), "--repo", REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"commit to {REPO}@main: 16 files")
    assert "saelens/layer_2/sae_weights.safetensors" in out and "--- README.md ---" in out
    assert fake_api.calls == []
    assert push_to_hub.main([str(tmp_path / "nothing"), "--repo", REPO, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no native export" in err and "scripts/export.py" in err
    assert push_to_hub.main([str(run), "--repo", "not a repo", "--dry-run"]) == 2
    assert "org/name" in capsys.readouterr().err


def test_push_without_token_says_how_to_log_in(tmp_path):
    """The CLI in a clean environment (no HF_TOKEN, an empty HF_HOME): one line, exit 2."""
    run = tmp_path / "run"
    make_run(run)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env["HF_HOME"] = str(tmp_path / "empty_hf_home")
    cmd = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(run), "--repo", REPO]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert (
        "no Hugging Face token" in lines[0] and "huggingface-cli login" in lines[0] and "HF_TOKEN" in lines[0]
    )


def test_push_errors(tmp_path, fake_api, monkeypatch):
    import requests

    run = tmp_path / "run"
    make_run(run)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_run(run, REPO)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def down(self, *a, **k):
        raise requests.exceptions.ConnectionError("no route to host")

    monkeypatch.setattr(FakeApi, "create_repo", down)
    with pytest.raises(HubError, match="could not reach the Hub.*nothing was uploaded"):
        push_run(run, REPO)
    assert "create_commit" not in [c[0] for c in fake_api.calls]


def test_sharded_export_is_planned_and_loaded_from_the_cache(tmp_path):
    """A native export over the file cap: every shard and the index are in the commit, and
    ``load_pretrained`` through the real ``snapshot_download`` (offline, from the cache) fetches
    them all and rebuilds the model."""
    run = tmp_path / "run"
    m = make_run(run)
    for p in (run / "export").iterdir():
        p.unlink()
    export_native(m, run / "export", extra_meta={"step": 40}, max_file_gb=1e-6)
    shards = sorted(p.name for p in (run / "export").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    files = {f.path_in_repo: f.content or f.source.read_bytes() for f in plan_upload(run, REPO)}
    assert {*shards, "model.safetensors.index.json", "config.json"} <= set(files)
    assert "model.safetensors" not in files
    # what download asks snapshot_download for (online it fetches only these patterns)
    assert all(
        any(fnmatch.fnmatch(n, p) for p in hub.LOADABLE_FILES)
        for n in [*shards, "model.safetensors.index.json"]
    )
    cache = tmp_path / "cache"
    write_hf_cache(cache, REPO, C1, files, ("main",))
    x = torch.randn(16, 3, 8) * 2
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, torchtitan_clt
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(torchtitan_clt.load_pretrained("{REPO}")(x), {str(tmp_path / "out.pt")!r})
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), m(x), rtol=1e-5, atol=1e-5)
    # a shard missing from the run: no native export to push
    (run / "export" / shards[0]).unlink()
    with pytest.raises(FileNotFoundError, match="has no native export"):
        plan_upload(run, REPO)
