"""Read a WandB offline run back (tests): the records of ``run-<id>.wandb``.

wandb 0.31 no longer ships a Python reader for its transaction log, so this is the format itself:
a 7-byte header (``:W&B``, magic, version), then LevelDB log records in 32 KiB blocks (4-byte
CRC, 2-byte length, 1-byte type: full / first / middle / last), each record's payload one
``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a WandB transaction log"
    i, payload = HEADER, b""
    while i + HEADER <= len(data):
        left = BLOCK - i % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            i += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[i : i + HEADER])
        if kind == 0 and n == 0:  # zero padding to the block's end
            i += left
            continue
        payload += data[i + HEADER : i + HEADER + n]
        i += HEADER + n
        if kind in (1, 4):  # full, or the last piece of a record
            rec = pb.Record()
            rec.ParseFromString(payload)
            yield rec
            payload = b""


def read_run(folder: str | Path) -> dict:
    """``{"id", "name", "tags", "config", "history": {step: {key: value}}, "artifacts": [...]}``
    of one offline run folder (``offline-run-<time>-<id>``)."""
    (log,) = Path(folder).glob("run-*.wandb")
    out: dict = {"history": {}, "config": {}, "artifacts": []}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, tags=list(rec.run.tags))
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "artifact":
            out["artifacts"].append(
                {
                    "name": rec.artifact.name,
                    "type": rec.artifact.type,
                    "files": [m.path for m in rec.artifact.manifest.contents],
                }
            )
    return out


def offline_runs(run_folder: str | Path) -> list[Path]:
    """The offline WandB runs under a training run folder, oldest first."""
    return sorted((Path(run_folder) / "wandb").glob("offline-run-*"))
