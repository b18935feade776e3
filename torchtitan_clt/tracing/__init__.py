"""After tracing: reopen and prune saved attribution graphs (``graphs``), view them offline
(``graph_html``), and steer or ablate a feature through the replacement model (``steer``).
circuit-tracer is needed for ``graphs`` only (``pip install -e '.[trace]'``)."""
