"""``synthetic`` source: random activations with a sparse structure a dictionary can learn.

Each token and layer activates ``k`` of ``n_features`` ground-truth features with positive
magnitudes ``a``; the input is ``x_l = Σ a_i D_i + noise`` and the target ``y_l = Σ a_i E_i`` with
fixed random unit directions ``D``, ``E`` shared by all layers (drawn from the seed, so every rank
agrees). A transcoder that learns the features reconstructs ``y`` well; an SAE reads ``x``.
Batch ``n`` of a rank is drawn from its own seed ``(seed, rank, n)``: the state is just ``n``.
Cost is one weighted row-gather-sum per row, so it keeps up with any trainer (use it for benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from torchtitan_clt.data.source import ActivationSource, SourceContext


class SyntheticSource(ActivationSource):
    def __init__(
        self,
        n_layers: int,
        d_model: int,
        ctx: SourceContext,
        n_features: int | None = None,
        k: int = 8,
        noise: float = 0.01,
    ):
        self.n_layers, self.d_in, self.d_out = n_layers, d_model, d_model
        self.layers = list(range(n_layers))
        self.model_name, self.hook_in, self.hook_out = "synthetic", "resid_mid", "mlp_out"
        self.device = torch.device(ctx.device)
        self.n_features = n_features or min(8 * d_model, 16384)
        self.k, self.noise = k, noise
        self.seed, self.rank = ctx.seed, ctx.dp_rank
        g = torch.Generator().manual_seed(ctx.seed)
        d_in = torch.randn(self.n_features, d_model, generator=g)
        d_out = torch.randn(self.n_features, d_model, generator=g)
        self.D = (d_in / d_in.norm(dim=1, keepdim=True)).to(self.device)  # [F, d]
        self.E = (d_out / d_out.norm(dim=1, keepdim=True)).to(self.device)  # [F, d]
        self.batches = 0

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.seed, self.rank, self.batches)) & (2**63 - 1))
        return g

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._generator()
        shape = (batch_size, self.n_layers, self.k)
        idx = torch.randint(self.n_features, shape, generator=g, device=self.device)
        mag = torch.rand(shape, generator=g, device=self.device) * 2.0 + 0.5
        # One weighted bag-sum per row (embedding_bag): no [B, L, k, d] intermediate, one pass.
        bags, w = idx.view(-1, self.k), mag.view(-1, self.k)
        x = F.embedding_bag(bags, self.D, per_sample_weights=w, mode="sum").view(*shape[:2], self.d_in)
        y = F.embedding_bag(bags, self.E, per_sample_weights=w, mode="sum").view(*shape[:2], self.d_out)
        x += torch.randn(x.shape, generator=g, device=self.device) * self.noise
        self.batches += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "describe": self.describe()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_describe(sd.get("describe"))
        self.batches = int(sd["batches"])


def build_synthetic_source(job_config: Any, ctx: SourceContext) -> ActivationSource:
    d = job_config.data
    return SyntheticSource(d.synthetic_n_layers, d.synthetic_d_model, ctx)
