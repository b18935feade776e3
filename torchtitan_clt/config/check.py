"""Check a config before any worker starts: ``python -m torchtitan_clt.config.check --config FILE
[--section.field=value ...]``. Exit 0 when it loads and validates, else one line and exit 2.

``run_train.sh`` runs it before torchrun, so a typo costs a fraction of a second (this imports no
torch) instead of a launch of every rank. Checks that need the registries or the data (a family
name, a dataset path) still run in the trainer, which reports them the same way.
"""

from __future__ import annotations

import sys

from torchtitan_clt.config.manager import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        return 0
    try:
        load_config(argv)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
