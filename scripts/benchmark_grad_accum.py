"""Peak memory of one BatchTopK training step: one batch of B rows vs the same B rows as
``grad_accum_steps`` micro-batches (the step's selection over all of them, issue 31).

Counted by ``tools/mem_trace.MemTracer`` on a real CPU step: the live bytes of every tensor the
step allocates (activations, autograd's saved tensors, gradients, the selection's candidates),
at their peak; the parameters, optimizer state and data buffer, which exist before the step and
are the same in both, are not counted. Step 1 runs first untraced (the optimizer state is made).
Both read the same rows (one draw of B rows per step, served in micro-batches), so their losses
agree: a check that the accumulated step is the same step.

    .venv/bin/python scripts/benchmark_grad_accum.py --out benchmarks/results/grad_accum_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from torchtitan_clt.config import load_config
from torchtitan_clt.tools.mem_trace import MemTracer

MIB = 2**20


class _SameRows:
    """The source's rows drawn ``batch`` at a time and served in any slices: the same rows for
    one batch and for its micro-batches."""

    def __init__(self, source, batch: int):
        self.source, self.batch, self.x, self.y = source, batch, None, None

    def next_batch(self, n: int):
        if self.x is None or self.x.shape[0] == 0:
            self.x, self.y = self.source.next_batch(self.batch)
        (x, self.x), (y, self.y) = (self.x[:n], self.x[n:]), (self.y[:n], self.y[n:])
        return x, y


def measure(scope: str, accum: int, dense: bool, a: argparse.Namespace, folder: str) -> dict:
    from torchtitan_clt.train import Trainer

    cfg = load_config(
        [
            "--data.source=synthetic",
            f"--data.synthetic_n_layers={a.layers}",
            f"--data.synthetic_d_model={a.d_model}",
            "--model.name=clt",
            "--model.activation=batchtopk",
            f"--model.batchtopk_scope={scope}",
            f"--model.features_per_layer={a.features}",
            f"--model.k={a.k}",
            "--loss.sparsity=none",
            f"--training.batch_size={a.batch}",
            f"--training.grad_accum_steps={accum}",
            "--training.steps=2",
            "--training.device=cpu",
            "--standardize.inputs=none",
            "--standardize.targets=none",
            "--checkpoint.enable=false",
            "--metrics.enable_tensorboard=false",
            "--metrics.save_jsonl=false",
            f"--kernels.sparse_density_threshold={0.0 if dense else 0.05}",
            f"--job.dump_folder={folder}",
            f"--job.name=ga_{scope}_{accum}_{int(dense)}",
        ]
    )
    trainer = Trainer(cfg)
    trainer.step_fn.source = _SameRows(trainer.source, a.batch)
    trainer.train_step(1)
    tracer = MemTracer()
    with tracer, tracer.phase("step"):
        stats = trainer.train_step(2)
    trainer.source.close()
    return {
        "scope": scope,
        "decoder": "dense" if dense else "sparse",
        "grad_accum_steps": accum,
        "micro_batch": a.batch // accum,
        "peak_step_mib": round(tracer.stats("step").peak["host"] / MIB, 2),
        "loss_step2": float(stats.loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dense in (False, True):
            for scope in ("layer", "all"):
                for accum in (1, a.accum):
                    rows.append(measure(scope, accum, dense, a, folder))
                    print(json.dumps(rows[-1]))
    dense_h = a.batch * a.layers * a.features * 4 / MIB
    doc = {
        "what": "peak live bytes allocated by one BatchTopK CLT training step (MemTracer, CPU fp32), "
        "one batch vs the same rows as micro-batches with the step's selection over all of them",
        "shape": {
            "batch": a.batch,
            "n_layers": a.layers,
            "d_model": a.d_model,
            "features_per_layer": a.features,
            "k": a.k,
        },
        "dense_h_of_the_batch_mib": round(dense_h, 2),
        "rows": rows,
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
