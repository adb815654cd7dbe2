"""A second audit workload where influence has work to do: digits that memorize their labels.

The bundled digits workload (``examples/digits.py``) keeps weight decay, so the model never
fits its 3 % flipped labels and the plain training loss finds them as well as any influence
ranking. Here 10 % of the training labels are flipped and the same MLP (64 → 32 → 10, tanh)
is trained full-batch with Adam for 2,000 epochs *without* weight decay: it fits every
flipped label (training accuracy 1.0), so the final loss no longer separates them and a
ranking has to use how much an example's own gradient moves the model (self-influence) or
how the example was learned (its loss at earlier checkpoints).

Training saves checkpoints at :data:`CHECKPOINT_EPOCHS` (the last is the workload's
checkpoint); all are cached as plain state dicts under a directory keyed by the settings
(``weights_only=True`` loads), like the bundled example. :func:`retrainer` returns the
retraining function of either workload (a training subset and a seed in, a trained model
out) that the LDS needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .digits import (
    TEST_SETS,
    DigitsData,
    ExampleShards,
    default_cache_dir,
    load_digits_data,
    make_model,
    save_state,
    write_digits_files,
)


@dataclass(frozen=True)
class TrainingSettings:
    """How a digits MLP is trained (full-batch Adam)."""

    epochs: int = 2000
    lr: float = 0.01
    weight_decay: float = 0.0
    hidden: int = 32


#: The memorizing workload: 10 % flipped labels, no weight decay, long training.
MEMORIZING = TrainingSettings()
MEMORIZING_FLIP_FRACTION = 0.10
#: The bundled workload's training (examples/digits.py's train_model defaults).
BUNDLED = TrainingSettings(epochs=400, lr=0.01, weight_decay=1e-3, hidden=32)
#: Epochs at which the memorizing training saves a checkpoint (the last is the final model).
CHECKPOINT_EPOCHS = (50, 100, 200, 400, 1000, 2000)

RetrainFunction = Callable[[torch.Tensor, torch.Tensor, int], torch.nn.Module]


def train_digits_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    settings: TrainingSettings,
    save_at: tuple[int, ...] = (),
) -> tuple[torch.nn.Module, dict[int, dict[str, torch.Tensor]]]:
    """Train the MLP on (x, y) with ``settings``; returns the model and copies of its state
    dict after each epoch in ``save_at``. Same procedure as ``digits.train_model``."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (n, 64) and y (n,), got {tuple(x.shape)}, {tuple(y.shape)}.")
    torch.manual_seed(seed)
    model = make_model(settings.hidden)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    saved: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(1, settings.epochs + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if epoch in save_at:
            saved[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, saved


def retrainer(settings: TrainingSettings = BUNDLED) -> RetrainFunction:
    """The retraining function of a digits workload: ``retrain(x, y, seed)`` trains a fresh
    MLP (initialised from ``seed``) on the given training subset."""

    def retrain(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
        return train_digits_mlp(x, y, seed, settings)[0]

    return retrain


def memorizing_data(seed: int = 0) -> DigitsData:
    """The digits split of ``seed`` with 10 % of the training labels flipped."""
    return load_digits_data(seed=seed, flip_fraction=MEMORIZING_FLIP_FRACTION)


def memorizing_checkpoints(cache_dir: str | Path | None = None, seed: int = 0) -> list[Path]:
    """Paths of the checkpoints at :data:`CHECKPOINT_EPOCHS` (training on first use)."""
    settings = {
        **asdict(MEMORIZING),
        "flip_fraction": MEMORIZING_FLIP_FRACTION,
        "seed": seed,
        "save_at": list(CHECKPOINT_EPOCHS),
        "v": 1,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / (
        f"digits-memorizing-{key}"
    )
    paths = [directory / f"epoch-{epoch}.pt" for epoch in CHECKPOINT_EPOCHS]
    if not all(p.exists() for p in paths):
        data = memorizing_data(seed)
        _, saved = train_digits_mlp(
            torch.from_numpy(data.x_train),
            torch.from_numpy(data.y_train),
            seed,
            replace(MEMORIZING, epochs=max(CHECKPOINT_EPOCHS)),
            save_at=CHECKPOINT_EPOCHS,
        )
        for epoch, path in zip(CHECKPOINT_EPOCHS, paths, strict=True):
            save_state(saved[epoch], path)
    return paths


def memorizing_workload(
    data_dir: str | Path | None = None,
    *,
    n_shards: int = 4,
    store: str = "influence_store_memorizing",
    method: Any = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Any:
    """The memorizing digits workload: the same split and test sets as the bundled one for
    ``seed`` 0 but 10 % flipped labels, the memorizing MLP's final checkpoint and all its
    saved checkpoints (the audit ranks by the mean loss over them). Building it writes
    nothing: the data files are written and the model trained on first use."""
    from ..workload import MethodSpec, Workload, load_tensor_file

    directory = (
        Path(data_dir)
        if data_dir is not None
        else default_cache_dir() / f"digits-memorizing-data-{seed}-{n_shards}"
    )

    @functools.cache
    def data() -> DigitsData:  # first use writes the files (building the workload writes none)
        return write_digits_files(
            directory, n_shards=n_shards, seed=seed, flip_fraction=MEMORIZING_FLIP_FRACTION
        )

    def test_loader(name: str) -> Callable[[], Any]:
        def load() -> Any:
            data()
            return load_tensor_file(directory / "test" / f"{name}.pt")

        return load

    return Workload(
        name="digits-memorizing",
        model_factory=lambda: make_model(MEMORIZING.hidden),
        checkpoint=lambda: memorizing_checkpoints(cache_dir, seed)[-1],
        # every saved checkpoint: the audit ranks by the mean loss over them
        checkpoints=lambda: memorizing_checkpoints(cache_dir, seed),
        loss=torch.nn.functional.cross_entropy,
        shards=ExampleShards(directory / "train", data),
        test_sets={name: test_loader(name) for name in TEST_SETS},
        method=method or MethodSpec(method="direct", regularization=1e-2),
        fit_shards=[f"shard-{i}" for i in range(n_shards)],
        batch_size=256,
        store=store,
        known_mislabeled=lambda: data().train_ids[data().flipped].tolist(),
        description=(
            "scikit-learn's 8x8 digits, 10 % of the training labels flipped, an MLP 64-32-10 "
            "trained without weight decay until it fits every label (influence has to find "
            "the flips; the final loss cannot)."
        ),
    )


def flipped_mask(data: DigitsData) -> np.ndarray:
    """(n_train,) True where the training label was flipped."""
    mask = np.zeros(len(data.y_train), dtype=bool)
    mask[data.flipped] = True
    return mask
