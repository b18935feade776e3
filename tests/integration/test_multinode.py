"""Two "nodes" on one machine: two launchers joined by a c10d rendezvous on localhost train
exactly like one process.

Each node is its own ``run_train.sh`` (its own torchrun agent) with NNODES=2, NODE_RANK=0/1 and
MASTER_ADDR/MASTER_PORT on localhost; the mesh spans both (tp = 2 across the nodes, the layout
that ``clt_8b.toml`` uses), on both tensor-parallel layouts (``parallelism.tp_layout``). The SLURM launcher is exercised the same way, with stand-ins for
``srun`` / ``scontrol`` that start one task per node locally. Tolerance as in test_parallel.py
(fp32 reordering only): losses within 1e-5 relative, final weights within 1e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import free_port
from test_parallel import ACTIVATIONS, BASE, ROOT, SPARSE, assert_same_training, reference_run

MESH = ["--parallelism.dp_shard=1", "--parallelism.tp=2"]
ACT = ACTIVATIONS["batchtopk_all"] + SPARSE


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, NGPU="1", **extra)


def _finish(procs, name) -> str:
    """Wait for the launchers; their joint output (stdout and stderr)."""
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        outs.append((p.returncode, out, err))
    assert all(rc == 0 for rc, _, _ in outs), f"{name}: " + "\n".join(
        str((rc, o[-3000:], e[-3000:])) for rc, o, e in outs
    )
    return "\n".join(o + e for _, o, e in outs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory, "batchtopk_all")


@pytest.mark.slow
@pytest.mark.parametrize("tp_layout", ["features", "code"])
def test_two_launchers_on_localhost_match_one_process(tmp_path, reference, tp_layout):
    port = str(free_port())
    args = [*BASE, *ACT, *MESH, f"--parallelism.tp_layout={tp_layout}"]
    args += [f"--job.dump_folder={tmp_path}", "--job.name=two_nodes"]
    procs = [
        subprocess.Popen(
            ["bash", str(ROOT / "run_train.sh"), *args],
            cwd=ROOT,
            env=_env(
                NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID="t2n"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    log = _finish(procs, "two launchers")
    assert ("y as this rank's 8 of 16 columns" in log) == (tp_layout == "code"), log[-2000:]  # the path taken
    assert_same_training(tmp_path / "two_nodes", reference)


@pytest.mark.slow
def test_slurm_launcher_with_local_stand_ins(tmp_path, reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: one task per node, each with its SLURM_NODEID, run here in the background.
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        'pids=(); for ((i=0; i<SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'
    )
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.2\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="fake[1-2]", SLURM_SUBMIT_DIR=str(ROOT), MASTER_PORT=str(free_port()),
    )  # fmt: skip
    args = [*BASE, *ACT, *MESH, f"--job.dump_folder={tmp_path}", "--job.name=slurm"]
    p = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "slurm_train.sh"), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _finish([p], "slurm launcher")
    assert_same_training(tmp_path / "slurm", reference)
