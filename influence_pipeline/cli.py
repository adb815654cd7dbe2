"""Command line: ``influence-pipeline run`` runs the main job on the bundled example."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .examples.digits import cached_checkpoint, load_digits_data, load_model
from .influence import DirectInfluence
from .store import InfluenceStore, ShardSpec

DEFAULT_STORE = os.environ.get("INFLUENCE_STORE", "influence_store")


def run_engine_demo(store_path: str = DEFAULT_STORE, n_shards: int = 4, top: int = 5) -> int:
    """The engine and the store on the bundled example: fit, factors of the validation
    set, every training shard scored into the store, then the most helpful and most
    harmful training examples for a few test points, read back with pandas."""
    data = load_digits_data()
    model = load_model(cached_checkpoint())
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    ids_train = torch.from_numpy(data.train_ids)
    x_test, y_test, ids_test = (torch.from_numpy(a) for a in data.test_sets["validation"])
    start = time.perf_counter()
    influence = DirectInfluence(model, F.cross_entropy, regularization=1e-2).fit(
        DataLoader(TensorDataset(x_train, y_train), batch_size=256)
    )
    store = InfluenceStore(store_path)
    store.save_block_mapper(influence)
    store.write_factors(
        "validation", influence, DataLoader(TensorDataset(x_test, y_test, ids_test), batch_size=64)
    )
    shards = np.array_split(np.arange(len(y_train)), n_shards)
    store.allocate_shards(
        "validation", [ShardSpec(f"shard-{i}", len(s)) for i, s in enumerate(shards)]
    )
    for i, rows in enumerate(shards):
        loader = DataLoader(
            TensorDataset(x_train[rows], y_train[rows], ids_train[rows]), batch_size=128
        )
        store.write_shard_scores("validation", i, influence, loader)
    print(
        f"DirectInfluence on digits: fit, factors and {n_shards} shards in "
        f"{time.perf_counter() - start:.1f} s, stored in {store.url}"
    )

    top_k = store.top_k("validation", k=top)
    flipped = set(data.train_ids[data.flipped].tolist())
    label = dict(zip(data.train_ids.tolist(), data.y_train.tolist(), strict=True))
    for test_id in top_k.test_id.unique()[:3]:
        rows = top_k[top_k.test_id == test_id]
        print(f"\ntest example {test_id}:")
        for kind in ("helpful", "harmful"):
            ids = rows[rows.kind == kind].sort_values("rank").train_id.tolist()
            shown = ", ".join(
                f"#{j} (label {label[j]}{', FLIPPED' if j in flipped else ''})" for j in ids
            )
            print(f"  most {kind:8s}: {shown}")
    self_influence = influence.self_influences(x_train, y_train)
    k = len(flipped)
    top_self = set(data.train_ids[torch.topk(self_influence, k).indices.numpy()].tolist())
    print(
        f"\n{len(top_self & flipped)} of the {k} flipped training labels are among the {k} "
        "largest self-influences."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="influence-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the main job on the bundled example")
    run.add_argument("--store", default=DEFAULT_STORE, help="artifact store path or URL")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_engine_demo(args.store)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
