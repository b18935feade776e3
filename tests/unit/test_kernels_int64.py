"""The selection kernels' index math past 2³¹ elements (issue 28), checked by the interpreter on a
strided view: 256 rows of 16 bf16 values, row ``a`` at element ``a·2²⁴``, so the last row starts
past 2³² (the address space of a ``[N·L, F]`` scope-"all" scan at N·L·F > 2³¹) while only 4096
values exist. The storage is reserved, never touched beyond those rows. An offset computed in
int32 wraps and reads outside the tensor (a crash: the check runs in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent(
    """
    import resource
    import torch
    from torchtitan_clt.kernels import select_triton

    A, M, S = 256, 16, 2**24  # row a at element a*S: offsets to 2^32; S itself fits int32
    base = torch.empty(A * S, dtype=torch.bfloat16)  # 8 GiB reserved, 4096 values written
    h3 = base.as_strided((A, 1, M), (S, 0, 1))
    h3.copy_(torch.randn(A, 1, M, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    ref = h3.float().clone()  # [A, 1, M], materialised
    k = 1000
    tau, krem = select_triton.radix_kth_largest(h3, torch.tensor([k]))
    assert float(tau[0]) == float(ref.reshape(-1).topk(k).values.min()), (tau, krem)
    idx = select_triton.compact(h3, tau, "ge")  # [A, 1, K], -1 padding
    got = sorted((a, int(f)) for a in range(A) for f in idx[a, 0] if f >= 0)
    want = sorted((int(a), int(f)) for a, _, f in (ref >= tau[0]).nonzero())
    assert got == want, (len(got), len(want))
    print("rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def test_selection_kernels_index_past_2_to_the_31():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode} (a negative one is a signal):\n{r.stderr[-3000:]}"
    # Only the rows were touched: far below the 8 GiB the view spans.
    assert int(r.stdout.split("rss_mib")[1]) < 2048, r.stdout
