"""The bundled example: scikit-learn's 8x8 digits, a small MLP, and deliberately flipped labels.

Everything ships inside installed packages (no download):

* 1,797 digit images (64 pixels, scaled to [0, 1]) from ``sklearn.datasets.load_digits``,
  split by a seeded permutation into 1,297 training points and two test sets of 250,
  ``validation`` and ``holdout``;
* ``flip_fraction`` (3 %) of the training labels replaced by another class, recorded in
  ``flipped`` so the data audit has something true to find;
* an MLP 64 → 32 → 10 (tanh), 2,410 parameters, trained full-batch with Adam and weight
  decay in a few seconds on a CPU; the checkpoint (a plain state dict, loaded with
  ``weights_only=True``) is cached under a directory keyed by the training settings.

Nothing happens when the workload is built (importing ``influence_pipeline.definitions``
trains nothing and writes nothing): the shard and test files are written on first use,
once, and the model is trained on first use of its checkpoint. Once written, the example's
files belong to the user: a deleted or rewritten shard file is never restored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..workload import DirectoryShards

N_FEATURES = 64
N_CLASSES = 10
TEST_SETS = ("validation", "holdout")


@dataclass(frozen=True)
class DigitsData:
    """Arrays of the example; ``train_ids`` etc. are indices into sklearn's digits."""

    x_train: np.ndarray  # (n_train, 64) float32
    y_train: np.ndarray  # (n_train,) int64, with the flipped labels
    y_train_clean: np.ndarray  # (n_train,) the original labels
    flipped: np.ndarray  # (n_flipped,) positions in the training set whose label was flipped
    train_ids: np.ndarray
    test_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # name -> (x, y, ids)


def load_digits_data(seed: int = 0, flip_fraction: float = 0.03, n_test: int = 250) -> DigitsData:
    """Split the digits deterministically and flip ``flip_fraction`` of the training labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    val, hold, train = order[:n_test], order[n_test : 2 * n_test], order[2 * n_test :]
    y_train_clean = y[train]
    n_flip = round(flip_fraction * len(train))
    flipped = np.sort(rng.choice(len(train), size=n_flip, replace=False))
    y_train = y_train_clean.copy()
    offsets = rng.integers(1, N_CLASSES, size=n_flip)
    y_train[flipped] = (y_train_clean[flipped] + offsets) % N_CLASSES
    return DigitsData(
        x_train=x[train],
        y_train=y_train,
        y_train_clean=y_train_clean,
        flipped=flipped,
        train_ids=train,
        test_sets=dict(
            zip(TEST_SETS, ((x[val], y[val], val), (x[hold], y[hold], hold)), strict=True)
        ),
    )


def make_model(hidden: int = 32) -> torch.nn.Module:
    """The example's MLP: 64 → hidden → 10 with tanh."""
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, N_CLASSES),
    )


def train_model(
    data: DigitsData,
    seed: int = 0,
    epochs: int = 400,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    hidden: int = 32,
) -> torch.nn.Module:
    """Train the MLP full-batch with Adam (a few seconds on one CPU core)."""
    torch.manual_seed(seed)
    model = make_model(hidden)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def default_cache_dir() -> Path:
    root = os.environ.get("INFLUENCE_PIPELINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "influence_pipeline"
    )
    return Path(root)


def cached_checkpoint(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    flip_fraction: float = 0.03,
    hidden: int = 32,
    n_test: int = 250,
) -> Path:
    """Path of the example checkpoint trained on the training split of these settings,
    training it on first use."""
    settings = {
        "seed": seed,
        "flip_fraction": flip_fraction,
        "hidden": hidden,
        "epochs": 400,
        "v": 1,
        **({} if n_test == 250 else {"n_test": n_test}),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"digits-mlp-{key}.pt"
    if not path.exists():
        data = load_digits_data(seed=seed, flip_fraction=flip_fraction, n_test=n_test)
        model = train_model(data, seed=seed, hidden=hidden)
        save_state(model.state_dict(), path)
    return path


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename: a
    concurrent reader never sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_model(checkpoint: str | Path, hidden: int = 32) -> torch.nn.Module:
    model = make_model(hidden)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    return model


@contextlib.contextmanager
def staged_files(root: Path) -> Iterator[Path]:
    """A staging folder inside ``root``: write ``test/`` and ``train/`` into it; on success they
    are renamed into ``root``, train last (its existence marks a complete set), so a
    concurrent or killed writer leaves no half set. If another process published first, its
    files are kept. The staging folder is removed in every case."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
    try:
        yield staging
        for part in ("test", "train"):
            try:
                os.rename(staging / part, root / part)
            except OSError:
                if not (root / part).exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_digits_files(
    data_dir: str | Path,
    n_shards: int = 4,
    n_test: int = 250,
    seed: int = 0,
    flip_fraction: float = 0.03,
) -> DigitsData:
    """Write the example as tensor files, ``train/shard-<i>.pt`` and ``test/<name>.pt``, once.

    Training ids are indices into sklearn's digits, so results can be joined back to the
    images. The files are written only when ``<data_dir>/train`` does not exist yet (into a
    temporary folder, then renamed, so a concurrent or killed writer leaves no half set);
    afterwards the files are the user's: deleted, replaced or added shards stay as they are.
    """
    from ..workload import ShardData, save_tensor_file

    data = load_digits_data(seed=seed, flip_fraction=flip_fraction, n_test=n_test)
    root = Path(data_dir)
    if (root / "train").exists():
        return data
    with staged_files(root) as staging:
        for i, rows in enumerate(np.array_split(np.arange(len(data.y_train)), n_shards)):
            save_tensor_file(
                staging / "train" / f"shard-{i}.pt",
                ShardData(
                    torch.from_numpy(data.x_train[rows]),
                    torch.from_numpy(data.y_train[rows]),
                    torch.from_numpy(data.train_ids[rows]),
                ),
            )
        for name, (x, y, ids) in data.test_sets.items():
            save_tensor_file(
                staging / "test" / f"{name}.pt",
                ShardData(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ids)),
            )
    return data


class ExampleShards(DirectoryShards):
    """:class:`DirectoryShards` whose files are written by ``prepare()`` on first use."""

    def __init__(self, directory: str | os.PathLike[str], prepare: Callable[[], Any]) -> None:
        super().__init__(directory)
        self._prepare = prepare

    def names(self) -> list[str]:
        self._prepare()
        return super().names()

    def path(self, name: str) -> Path:
        self._prepare()
        return super().path(name)


def digits_workload(
    data_dir: str | Path | None = None,
    *,
    n_shards: int = 4,
    n_test: int = 250,
    store: str = "influence_store",
    method: Any = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """The bundled workload: digits, the cached MLP, ``n_shards`` training shard files and
    the test sets ``validation`` and ``holdout`` (``n_test`` points each)."""
    from ..workload import MethodSpec, Workload, load_tensor_file

    directory = (
        Path(data_dir)
        if data_dir is not None
        else default_cache_dir() / f"digits-data-{n_shards}-{n_test}"
    )

    @functools.cache
    def data() -> DigitsData:  # first use writes the files (once per data directory)
        return write_digits_files(directory, n_shards=n_shards, n_test=n_test)

    def test_loader(name: str) -> Callable[[], Any]:
        def load() -> Any:
            data()
            return load_tensor_file(directory / "test" / f"{name}.pt")

        return load

    return Workload(
        name="digits",
        model_factory=make_model,
        checkpoint=lambda: cached_checkpoint(cache_dir, n_test=n_test),
        loss=torch.nn.functional.cross_entropy,
        shards=ExampleShards(directory / "train", data),
        test_sets={name: test_loader(name) for name in TEST_SETS},
        method=method or MethodSpec(method="direct", regularization=1e-2),
        fit_shards=[f"shard-{i}" for i in range(n_shards)],
        batch_size=256,
        store=store,
        known_mislabeled=lambda: data().train_ids[data().flipped].tolist(),
        retrain=_retrain_bundled,
        description=(
            "scikit-learn's 8x8 digits, an MLP 64-32-10, 3 % of the training labels flipped "
            "on purpose (the audit should find them)."
        ),
    )


def _retrain_bundled(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
    """Retrain the bundled MLP on a training subset (for the quality assets' LDS)."""
    from .digits_memorizing import BUNDLED, retrainer

    return retrainer(BUNDLED)(x, y, seed)
