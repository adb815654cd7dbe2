"""Command line: ``influence-pipeline run`` runs the main job on the bundled example."""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .examples.digits import cached_checkpoint, load_digits_data, load_model
from .influence import DirectInfluence


def run_engine_demo(n_test: int = 3, top: int = 5) -> int:
    """The engine on the bundled example: the most helpful and most harmful training
    examples for a few test points, and the training points with the largest
    self-influence (where the flipped labels should be)."""
    data = load_digits_data()
    model = load_model(cached_checkpoint())
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test, _ = data.test_sets["validation"]
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=256)
    start = time.perf_counter()
    influence = DirectInfluence(model, F.cross_entropy, regularization=1e-2).fit(loader)
    scores = influence.influences(
        torch.from_numpy(x_test[:n_test]), torch.from_numpy(y_test[:n_test]), x_train, y_train
    )
    print(f"DirectInfluence on digits: fit + scores in {time.perf_counter() - start:.1f} s")
    flipped = set(data.flipped.tolist())
    for i in range(n_test):
        row = scores[i]
        helpful = torch.topk(row, top).indices.tolist()
        harmful = torch.topk(-row, top).indices.tolist()
        print(f"\ntest point {i} (label {int(y_test[i])}):")
        print("  most helpful :", ", ".join(f"#{j} (label {int(y_train[j])})" for j in helpful))
        print(
            "  most harmful :",
            ", ".join(
                f"#{j} (label {int(y_train[j])}{', FLIPPED' if j in flipped else ''})"
                for j in harmful
            ),
        )
    self_influence = influence.self_influences(x_train, y_train)
    k = len(flipped)
    found = len(set(torch.topk(self_influence, k).indices.tolist()) & flipped)
    print(
        f"\n{found} of the {k} flipped training labels are among the {k} largest self-influences."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="influence-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the main job on the bundled example")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_engine_demo()
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
