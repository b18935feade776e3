"""The Hugging Face Hub: load exports by repo id, push a run as one commit.

Names ``load_pretrained`` takes besides a local folder (a local folder of that name wins):

    org/name                 the repo's root at ``main``
    org/name@revision        a branch, tag or commit
    hf://org/name/sub/dir    a folder inside the repo (e.g. ``circuit_tracer``), ``@revision``
                             after the name: ``hf://org/name@v1/circuit_tracer``

They go through ``huggingface_hub.snapshot_download``, so its cache (``HF_HOME`` /
``HF_HUB_CACHE``), ``HF_HUB_OFFLINE`` and token apply; only the files a loader reads are fetched.

``push_run`` uploads what ``plan_upload`` lists (the native export at the root, every shard and the
index of a sharded one included, ``circuit_tracer/``
and ``saelens/`` when present, the report and a generated model card) with one ``create_commit``:
the repo gets all of it or none of it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from torchtitan_clt.errors import HubError

HF_PREFIX = "hf://"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^@\s]+))?$")
_URI = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^/@\s]+))?(?:/(?P<sub>[^@\s]*))?$")
# What the loaders read from a folder (native export, circuit-tracer CLT or transcoder set).
LOADABLE_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",  # a native export over checkpoint.export_max_file_gb: the index
    "model-*-of-*.safetensors",  # and its shards
    "config.yaml",
    "conversion.json",
    "W_enc_*.safetensors",
    "W_dec_*.safetensors",
    "layer_*.safetensors",
)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


def parse_hub_ref(spec: str | os.PathLike) -> HubRef | None:
    """The Hub reference ``spec`` names, or None when it is not one (a ``Path`` never is)."""
    if not isinstance(spec, str):
        return None
    m = _URI.match(spec[len(HF_PREFIX) :]) if spec.startswith(HF_PREFIX) else _REPO.match(spec)
    if m is None:
        if spec.startswith(HF_PREFIX):
            raise ValueError(
                f"{spec!r} is not a Hub reference: write hf://org/name, hf://org/name/sub/folder "
                "or hf://org/name@revision/sub/folder."
            )
        return None
    sub = (m.groupdict().get("sub") or "").strip("/")
    if ".." in sub.split("/"):
        raise ValueError(f"{spec!r}: '..' is not allowed in a Hub folder path.")
    return HubRef(m["repo"], m["rev"], sub)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(ref: HubRef) -> Path:
    """The local snapshot folder of ``ref`` (downloaded, or from the cache when offline)."""
    import huggingface_hub
    from huggingface_hub import errors

    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    rev = f" --revision {ref.revision}" if ref.revision else ""
    try:
        root = huggingface_hub.snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            allow_patterns=[prefix + p for p in LOADABLE_FILES],
            library_name="torchtitan_clt",
        )
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(
            f"{ref}: the Hub repo {ref.repo_id} has no revision {ref.revision!r}; give a branch, "
            "tag or commit that exists."
        ) from e
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise FileNotFoundError(
            f"{ref}: no local folder of that name, and no Hub repo {ref.repo_id} you can read. Check "
            "the name; for a private or gated repo log in (`huggingface-cli login`, or set HF_TOKEN)."
        ) from e
    except errors.LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{ref}: not in the Hugging Face cache and {why}. Download it once where the Hub is "
            f"reachable (`huggingface-cli download {ref.repo_id}{rev}`, same HF_HOME), or give a "
            "local folder."
        ) from e
    folder = Path(root) / ref.subfolder
    if not folder.is_dir():
        have = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        where = "the cached snapshot (HF_HUB_OFFLINE is set)" if _offline() else "the repo"
        raise FileNotFoundError(
            f"{ref}: {where} has no folder {ref.subfolder!r} with loadable files (folders: "
            f"{', '.join(have) or 'none'})."
        )
    return folder


def resolve_pretrained(path: str | os.PathLike) -> Path:
    """A local folder for ``load_pretrained``: ``path`` itself when it exists, else its Hub
    snapshot. Anything else: FileNotFoundError naming both readings."""
    local = Path(path)
    if local.is_dir() and not str(path).startswith(HF_PREFIX):
        return local
    ref = parse_hub_ref(path)
    if ref is None:
        raise FileNotFoundError(
            f"{local} is not a folder; give the native export folder (outputs/<job>/export, "
            "written at the end of training when checkpoint.export = true), a circuit-tracer "
            "folder, or a Hub repo (org/name, org/name@revision, hf://org/name/sub/folder)."
        )
    return download(ref)


# --- push ----------------------------------------------------------------------------------------
# Run-folder subfolders uploaded as they are (when present; features/: the browser and
# circuit-tracer's feature files), and the report's files.
UPLOAD_FOLDERS = ("circuit_tracer", "saelens", "features")
REPORT_FILES = ("eval.json", "*.png")


@dataclass(frozen=True)
class PlannedFile:
    path_in_repo: str
    source: Path | None  # None: generated (``content``)
    content: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.source.stat().st_size


def plan_upload(run: str | os.PathLike, repo_id: str, header_comment: str | None = None) -> list[PlannedFile]:
    """The files one commit of ``run`` to ``repo_id`` holds: the native export at the root,
    ``circuit_tracer/``, ``saelens/`` and ``features/`` when the run has them, ``report/``
    (eval.json, plots), ``training_config.toml`` and the generated ``README.md``. Checkpoints and logs stay local."""
    from torchtitan_clt.checkpoint.model_card import render_model_card

    if not re.fullmatch(rf"{_PART}/{_PART}", repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id: give org/name (e.g. my-user/my-clt).")
    run = Path(run)
    from torchtitan_clt.checkpoint.safetensors_stream import weight_files

    export = run / "export"
    try:
        weights = weight_files(export) if (export / "config.json").is_file() else None
    except FileNotFoundError:
        weights = None
    if weights is None:
        raise FileNotFoundError(
            f"{export} has no native export (config.json + model.safetensors, or its shards and "
            "model.safetensors.index.json): train with checkpoint.export = true, or export a "
            f"checkpoint into the run: scripts/export.py {run} --out {run}"
        )
    files = [PlannedFile(p.name, p) for p in sorted(export.iterdir()) if p.is_file()]
    for name in UPLOAD_FOLDERS:
        if (run / name).is_dir():
            files += [
                PlannedFile(p.relative_to(run).as_posix(), p)
                for p in sorted((run / name).rglob("*"))
                if p.is_file() and not p.name.startswith(".")
            ]
    report = sorted({p for pat in REPORT_FILES for p in (run / "report").glob(pat) if p.is_file()})
    files += [PlannedFile(f"report/{p.name}", p) for p in report]
    if (run / "config.toml").is_file():
        files.append(PlannedFile("training_config.toml", run / "config.toml"))
    card = render_model_card(run, repo_id, [f.path_in_repo for f in files], header_comment)
    files.append(PlannedFile("README.md", None, card.encode("utf-8")))
    return files


def describe_plan(repo_id: str, revision: str | None, files: list[PlannedFile]) -> str:
    """The planned commit as text (``--dry-run``): one line per file, then the model card."""
    total = sum(f.size for f in files)
    lines = [f"commit to {repo_id}@{revision or 'main'}: {len(files)} files, {total / 2**20:.2f} MiB"]
    for f in files:
        src = "generated" if f.source is None else str(f.source)
        lines.append(f"  {f.path_in_repo:<48} {f.size:>12,} B  {src}")
    card = next((f.content for f in files if f.path_in_repo == "README.md"), None)
    if card is not None:
        lines += ["", "--- README.md ---", card.decode("utf-8")]
    return "\n".join(lines)


def _token_or_fail(token: str | None) -> str:
    import huggingface_hub

    if _offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (or set HF_HUB_OFFLINE=0).")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: run `huggingface-cli login` (or `hf auth login`) or set "
            "HF_TOKEN to a token with write access, then retry (--dry-run shows the commit without one)."
        )
    return token


def push_run(
    run: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if needed (``private`` then applies) and upload ``plan_upload(run)`` in
    one commit on ``revision`` (a branch, made from main when new); returns the commit URL."""
    import requests
    from huggingface_hub import CommitOperationAdd, HfApi, errors

    files = plan_upload(run, repo_id)
    token = _token_or_fail(token)
    api = HfApi(token=token, library_name="torchtitan_clt")
    ops = [
        CommitOperationAdd(f.path_in_repo, f.content if f.source is None else str(f.source)) for f in files
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            ops,
            commit_message=commit_message or f"Upload {Path(run).name} (torchtitan_clt)",
            revision=revision,
        )
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = (
            "the token was refused: log in again with a token that has write access to "
            f"{repo_id.split('/')[0]} (`huggingface-cli login`)"
            if status in (401, 403)
            else "check the repo name and your rights on it"
        )
        raise HubError(f"the Hub refused the push to {repo_id} (HTTP {status}): {hint}.") from e
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        errors.OfflineModeIsEnabled,
    ) as e:
        raise HubError(
            f"could not reach the Hub to push {repo_id} ({type(e).__name__}): check the network "
            "(or HF_ENDPOINT / proxy settings) and retry; nothing was uploaded."
        ) from e
    return str(info.commit_url)
