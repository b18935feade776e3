"""Metrics: training metrics (FVU, L0, dead features) and where they are written."""

from torchtitan_clt.metrics.logger import MetricsLogger, Throughput, format_eta
from torchtitan_clt.metrics.training import (
    DeadFeatureTracker,
    FVUAccumulator,
    FVUSums,
    fvu_per_layer,
    fvu_sums,
    l0_per_layer,
    mean_finite,
)

__all__ = [
    "DeadFeatureTracker",
    "FVUAccumulator",
    "FVUSums",
    "MetricsLogger",
    "Throughput",
    "format_eta",
    "fvu_per_layer",
    "fvu_sums",
    "l0_per_layer",
    "mean_finite",
]
