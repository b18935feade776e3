"""circuit-tracer's graph UI served on this machine only.

``python -m circuit_tracer start-server`` binds every interface (``("", port)``), so on a shared
node anyone who can reach it reads the graphs. ``serve_local`` runs circuit-tracer's own handler
on ``127.0.0.1`` (another host only when asked). Its page still loads d3, dagre and its scripts
from public CDNs; ``<slug>.html`` (``graph_html``) is the offline view.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

LOCALHOST = "127.0.0.1"


def serve_local(data_dir: str | Path, port: int = 8032, host: str = LOCALHOST) -> Any:
    """Start circuit-tracer's UI server for ``data_dir`` (the ``--out`` of scripts/trace.py) on
    ``host:port`` in a thread; returns circuit-tracer's ``Server`` (``.stop()``)."""
    from circuit_tracer.frontend import local_server as ls

    handler = functools.partial(
        ls.CircuitGraphHandler, frontend_dir=ls.DEFAULT_FRONTEND_DIR, data_dir=str(data_dir)
    )
    httpd = ls.ReusableTCPServer((host, port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return ls.Server(httpd, thread)
