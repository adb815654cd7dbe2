"""Attribution quality: mislabel-detection metrics, the linear datamodeling score (LDS),
retraining on subsets and the reports built from them. Pure numpy/torch (no dagster)."""

from .lds import LdsResult, lds, predicted_losses, sample_subsets
from .metrics import (
    FRACTIONS,
    FlagQuality,
    average_precision,
    average_ranks,
    flag_quality,
    fraction_found,
    spearman,
)

__all__ = [
    "FRACTIONS",
    "FlagQuality",
    "LdsResult",
    "average_precision",
    "average_ranks",
    "flag_quality",
    "fraction_found",
    "lds",
    "predicted_losses",
    "sample_subsets",
    "spearman",
]
