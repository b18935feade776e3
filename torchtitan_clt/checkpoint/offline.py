"""Offline use of checkpoints (export, eval): rebuild a saved model in one process, any mesh."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_clt.checkpoint.blobs import dist_on, quiet_dcp
from torchtitan_clt.checkpoint.layout import META_FILE, resolve_checkpoint
from torchtitan_clt.checkpoint.stateful import ModelWrapper


def load_model_from_checkpoint(path: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model saved in a checkpoint (any mesh) in one process: returns (model in eval
    mode, its meta.json). Families of ``job.custom_import`` are imported from the run's config."""
    from torchtitan_clt.protocols import import_custom_modules
    from torchtitan_clt.protocols.registry import model_registry
    from torchtitan_clt.protocols.transcoder import TranscoderArgs

    ckpt, run = resolve_checkpoint(path, step)
    meta = json.loads((ckpt / META_FILE).read_text())
    if run is not None:
        from torchtitan_clt.config.manager import load_config

        import_custom_modules(
            load_config(["--config", str(run / "config.toml")], check=False).job.custom_import
        )

    if not meta.get("model_args"):
        raise ValueError(
            f"{ckpt / META_FILE} has no model_args (the model was not saved through ModelWrapper)."
        )
    args = TranscoderArgs.from_dict(meta["model_args"])
    with torch.device("meta"):
        model = model_registry.get(args.family).build_fn(args)
    model.to_empty(device=device)
    with quiet_dcp():
        dcp.load({"model": ModelWrapper(model)}, checkpoint_id=str(ckpt), no_dist=not dist_on())
    return model.eval(), meta
