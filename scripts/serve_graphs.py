#!/usr/bin/env python
"""Serve circuit-tracer's graph UI for a folder of graphs on 127.0.0.1 (not every interface).

  .venv/bin/python scripts/serve_graphs.py graphs            # then open http://127.0.0.1:8032/index.html
  .venv/bin/python scripts/serve_graphs.py graphs --host 0.0.0.0 --port 9000   # on purpose only

The UI page loads its scripts from public CDNs; without a network open ``graphs/<slug>.html``
(written by scripts/trace.py) instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from torchtitan_clt.tracing.serve import LOCALHOST, serve_local

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", type=Path, help="the --out folder of scripts/trace.py")
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--host", default=LOCALHOST, help="interface to listen on (default: this machine only)")
    a = p.parse_args(argv)
    if not (a.graphs / "graph-metadata.json").is_file():
        print(
            f"serve_graphs: {a.graphs} has no graph-metadata.json; scripts/trace.py --out writes it.",
            file=sys.stderr,
        )
        return 2
    server = serve_local(a.graphs, a.port, a.host)
    print(f"serving {a.graphs} at http://{a.host}:{a.port}/index.html (Ctrl+C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
