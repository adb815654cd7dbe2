"""Rankings of training examples for mislabel detection, and their report.

A ranking is a score per training example, higher = more suspicious. The candidates:

* ``loss``: the training loss ℓ(θ; zᵢ) at the audited checkpoint;
* ``self_influence:<method>``: ⟨A⁻¹gᵢ, gᵢ⟩ of a fitted influence method;
* ``checkpoint_loss``: the mean training loss over saved training checkpoints (an example the
  model learned late, or only by memorizing it, has a high loss early on);
* combinations by mean rank (ties averaged; scale-free, so no unit mixes with another);
* ``random``: a seeded permutation, the floor.

:func:`mislabel_report` evaluates each against the known corrupted examples: the fraction
found in the top 1/5/10/20 % and the average precision (see :mod:`.metrics`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..influence.composable import TorchComposableInfluence
from ..influence.gradient_provider import LossType
from .metrics import FRACTIONS, average_precision, average_ranks, fraction_found


def per_sample_losses(
    model: torch.nn.Module, loss: LossType, x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """(n,) per-sample losses ℓ(θ; xᵢ, yᵢ) = loss(model(xᵢ[None]), yᵢ[None]), vectorised."""
    with torch.no_grad():
        values = torch.vmap(lambda xi, yi: loss(model(xi[None]), yi[None]))(x, y)
    return values.double().cpu().numpy()


def checkpoint_loss(
    model_factory: Callable[[], torch.nn.Module],
    checkpoints: Sequence[str | os.PathLike[str]],
    loss: LossType,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 4096,
) -> np.ndarray:
    """(n,) the mean per-sample loss over saved training checkpoints (state dicts loaded
    with ``weights_only=True``), batch by batch: the audit's ranking where a workload saves
    checkpoints during training."""
    if not checkpoints:
        raise ValueError("checkpoints is empty; give at least one state-dict file.")
    total = np.zeros(len(y), dtype=np.float64)
    for path in checkpoints:
        model = model_factory()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model = model.eval().to(dtype=x.dtype) if x.is_floating_point() else model.eval()
        for i in range(0, len(y), batch_size):
            total[i : i + batch_size] += per_sample_losses(
                model, loss, x[i : i + batch_size], y[i : i + batch_size]
            )
    return total / len(checkpoints)


def self_influences(
    influence: TorchComposableInfluence, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """(n,) self-influences of a fitted method, batch by batch."""
    parts = [
        influence.self_influences(x[i : i + batch_size], y[i : i + batch_size])
        for i in range(0, len(y), batch_size)
    ]
    return torch.cat(parts).double().cpu().numpy()


def mean_rank(*scores: np.ndarray) -> np.ndarray:
    """The mean of the averaged ranks of several rankings (higher = more suspicious)."""
    return np.mean([average_ranks(s) for s in scores], axis=0)


def mislabel_report(
    rankings: Mapping[str, np.ndarray],
    corrupted: np.ndarray,
    fractions: Sequence[float] = FRACTIONS,
) -> pd.DataFrame:
    """One row per ranking: ``top_<f>%`` (fraction of corrupted found) and ``ap``."""
    rows = []
    for name, scores in rankings.items():
        found = fraction_found(scores, corrupted, fractions)
        row: dict[str, object] = {"ranking": name}
        row.update({f"top_{round(100 * f)}%": v for f, v in found.items()})
        row["ap"] = average_precision(scores, corrupted)
        rows.append(row)
    return pd.DataFrame(rows)
