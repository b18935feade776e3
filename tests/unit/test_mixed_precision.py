"""``training.mixed_precision``: fp16 is refused with a reason, bf16 / fp32 / auto train (issue 28).

fp16 without a GradScaler trains unscaled (small gradients flush to zero, large ones overflow);
the trainer has no loss scaling, so the config stops the run and points to bf16 instead of
training silently wrong. The refusal comes from the loader, before anything is built.
"""

from __future__ import annotations

import pytest
import torch

from torchtitan_clt.config import ConfigError, load_config
from torchtitan_clt.trainer.build import autocast_dtype


def test_fp16_is_refused_with_a_pointer_to_bf16():
    with pytest.raises(ConfigError, match=r'mixed_precision = "fp16" is not supported.*"bf16"'):
        load_config(["--config", "train_configs/debug_model.toml", "--training.mixed_precision=fp16"])


@pytest.mark.parametrize(
    "mp, cpu, cuda",
    [("auto", None, torch.bfloat16), ("bf16", torch.bfloat16, torch.bfloat16), ("fp32", None, None)],
)
def test_other_settings_load_and_pick_their_autocast_dtype(mp, cpu, cuda):
    cfg = load_config(["--config", "train_configs/debug_model.toml", f"--training.mixed_precision={mp}"])
    assert autocast_dtype(cfg, torch.device("cpu")) is cpu
    assert autocast_dtype(cfg, torch.device("cuda")) is cuda
