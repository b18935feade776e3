"""The tensor-parallel plan of a family's methods is data (``ModelSpec.tp_methods`` beside the
layout's table): a family's own method, declared ``FeatureShardedOutput``, runs on the rank's
shards and returns a ``Shard`` DTensor whose whole tensor is what one process computes, on both
layouts; undeclared, the same method mixes DTensor weights with a plain input and fails; a table
naming a method the model lacks stops with a message naming the field.

Two gloo ranks (tp = 2) through ``parallelize_model`` (the trainer's entry), against the same
model in one process with the same seed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import run_ranks, tiny_args

from torchtitan_clt.models.clt.model import CrossLayerTranscoder

WORLD = 2


class ScoringCLT(CrossLayerTranscoder):
    """A CLT with one more method: every feature's raw score ``x · W_enc`` (no bias)."""

    def feature_scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nld,lfd->nlf", x.to(self.W_enc.dtype), self.W_enc)  # [N, L, F]


def _worker(rank: int, store: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from torchtitan_clt.config import JobConfig
    from torchtitan_clt.distributed.parallel_dims import ParallelDims
    from torchtitan_clt.distributed.parallelize import parallelize_model
    from torchtitan_clt.distributed.tensor_parallel import FeatureShardedOutput
    from torchtitan_clt.protocols import model_registry

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        args = tiny_args("clt", "relu", L=3, d=4, F=8)
        x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(3))
        ref = ScoringCLT(args)
        ref.init_weights(11)
        want = ref.feature_scores(x)
        clt = model_registry.get("clt")
        declared = {"feature_scores": FeatureShardedOutput()}
        for layout in ("features", "code"):
            cfg = JobConfig()
            cfg.parallelism.tp, cfg.parallelism.dp_shard, cfg.parallelism.tp_layout = WORLD, 1, layout
            for methods in (declared, None):
                spec = dataclasses.replace(clt, build_fn=ScoringCLT, tp_methods=methods)
                dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=WORLD, world_size=WORLD)
                dims.build_mesh("cpu")
                with torch.device("meta"):
                    model = spec.build_fn(args)
                parallelize_model(model, spec, dims, cfg)
                model.to_empty(device="cpu")
                model.init_weights(11)
                if methods is None:
                    with pytest.raises(Exception, match="DTensor"):
                        model.feature_scores(x)
                    continue
                got = model.feature_scores(x)
                assert isinstance(got, DTensor) and got.placements == (Shard(2),), (layout, got)
                assert got.to_local().shape == (5, 3, 8 // WORLD)
                torch.testing.assert_close(
                    got.full_tensor(), want, rtol=0, atol=1e-6
                )  # a d-term dot per entry either way
                # the layout's own entries are still there
                assert isinstance(model.encode(x), DTensor)

        spec = dataclasses.replace(clt, tp_methods={"no_such_method": FeatureShardedOutput()})
        dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=WORLD, world_size=WORLD)
        dims.build_mesh("cpu")
        with torch.device("meta"):
            model = spec.build_fn(args)
        cfg = JobConfig()
        cfg.parallelism.tp, cfg.parallelism.dp_shard = WORLD, 1
        with pytest.raises(ValueError, match="'no_such_method'.*ModelSpec.tp_methods"):
            parallelize_model(model, spec, dims, cfg)
    finally:
        dist.destroy_process_group()


def test_a_family_declares_how_its_own_method_lies_on_the_mesh(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("needs torch.distributed")
    run_ranks(_worker, (str(tmp_path / "store"),), WORLD, timeout_s=180)
