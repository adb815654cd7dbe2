"""A small deterministic workload for store tests (importable by spawned worker processes)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import DirectInfluence
from influence_pipeline.store import InfluenceStore, ShardSpec

N_TRAIN, N_TEST, N_SHARDS = 240, 30, 8
SHARD_ROWS = [31, 29, 30, 30, 33, 27, 30, 30]


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TEST, 6, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=gen)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def shard_rows() -> list[np.ndarray]:
    bounds = np.cumsum([0, *SHARD_ROWS])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(N_SHARDS)]


def shard_loader(i: int, batch_size: int = 8) -> DataLoader:
    x, y, _, _ = data()
    rows = torch.from_numpy(shard_rows()[i])
    return DataLoader(TensorDataset(x[rows], y[rows], 1000 + rows), batch_size=batch_size)


def fitted(net: torch.nn.Module | None = None) -> DirectInfluence:
    x, y, _, _ = data()
    net = net or model()
    return DirectInfluence(net, F.cross_entropy, regularization=0.1).fit(
        DataLoader(TensorDataset(x, y), batch_size=64)
    )


def prepare(root: str) -> tuple[InfluenceStore, DirectInfluence]:
    """Block mapper, factors of test set 'val' and all shards allocated."""
    store = InfluenceStore(root)
    influence = fitted()
    store.save_block_mapper(influence)
    _, _, xt, yt = data()
    store.write_factors("val", influence, DataLoader(TensorDataset(xt, yt), batch_size=7))
    store.allocate_shards(
        "val", [ShardSpec(f"shard-{i}", n) for i, n in enumerate(SHARD_ROWS)], shard_width=16
    )
    return store, influence


def score_in_process(root: str, shard: int, start_flag: str | None = None) -> None:
    """Worker: load the block mapper from the store and score one shard."""
    if start_flag is not None:
        while not os.path.exists(start_flag):  # start all workers together
            time.sleep(0.01)
    store = InfluenceStore(root)
    influence = store.load_block_mapper(model())
    store.write_shard_scores("val", f"shard-{shard}", influence, shard_loader(shard))


class SlowLoader:
    """Yields a shard's batches; after ``after`` batches touches ``flag`` and sleeps."""

    def __init__(self, shard: int, after: int, flag: str) -> None:
        self.shard, self.after, self.flag = shard, after, flag

    def __iter__(self):
        for i, batch in enumerate(shard_loader(self.shard, batch_size=4)):
            if i == self.after:
                with open(self.flag, "w") as handle:
                    handle.write("mid-shard")
                time.sleep(600)
            yield batch


def score_slowly(root: str, shard: int, after: int, flag: str) -> None:
    store = InfluenceStore(root)
    influence = store.load_block_mapper(model())
    store.write_shard_scores("val", f"shard-{shard}", influence, SlowLoader(shard, after, flag))
