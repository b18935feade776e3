"""What ``run_train.sh`` runs before torchrun: ``python -m torchtitan_clt.prelaunch --config FILE
[overrides]``. The config check (``config.check``: names, dataset, LLM layers; exit 2 with one
line), then whether this config's run is already complete (``checkpoint.layout.run_complete``:
exit 3, which ``run_train.sh`` turns into 0, so a relaunched finished run rewrites nothing).
Torch-free, like both of them: it answers in well under two seconds."""

from __future__ import annotations

import sys

from torchtitan_clt.checkpoint.layout import run_complete
from torchtitan_clt.config import check

COMPLETE = 3  # exit code: the run is already complete, nothing to do (run_train.sh exits 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = check.main(argv)
    if rc != 0 or "--help" in argv or "-h" in argv:
        return rc
    if (done := run_complete(check.load_config(argv))) is not None:
        print(done)
        return COMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
