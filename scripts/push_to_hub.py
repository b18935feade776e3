"""Push a run to the Hugging Face Hub in one commit: native export (one ``model.safetensors``, or
every ``model-*-of-*.safetensors`` shard and ``model.safetensors.index.json`` of an export over
``checkpoint.export_max_file_gb``), circuit-tracer and SAELens folders and the feature examples
(``features/``: circuit-tracer's feature files and the browser) when present, the report and a
generated model card (README.md).

  .venv/bin/python scripts/push_to_hub.py outputs/<job> --repo org/name --dry-run   # show the commit
  .venv/bin/python scripts/push_to_hub.py outputs/<job> --repo org/name [--private] [--revision BRANCH]

Needs a token with write access (`huggingface-cli login`, or HF_TOKEN). To add formats first:
``scripts/export.py outputs/<job> --format saelens --out outputs/<job>`` (writes ``saelens/``).
Load it back with ``torchtitan_clt.load_pretrained("org/name")``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from torchtitan_clt.checkpoint.hub import HubError, describe_plan, plan_upload, push_run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "run",
        help="run folder (outputs/<job>) holding export/ (and optionally circuit_tracer/, saelens/, features/)",
    )
    p.add_argument("--repo", required=True, help="Hub repo id, org/name (created when missing)")
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its setting)"
    )
    p.add_argument(
        "--revision", default=None, help="branch to commit to (created from main when missing; default main)"
    )
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument(
        "--dry-run", action="store_true", help="print the planned commit and model card; send nothing"
    )
    a = p.parse_args(argv)
    try:
        if a.dry_run:
            print(describe_plan(a.repo, a.revision, plan_upload(a.run, a.repo)))
            return 0
        url = push_run(a.run, a.repo, private=a.private, revision=a.revision, commit_message=a.message)
    except (HubError, FileNotFoundError, ValueError) as e:
        print(f"push_to_hub: {e}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
