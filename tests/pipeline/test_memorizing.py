"""The audit's checkpoint-loss ranking through the assets, and the memorizing example.

A tiny float64 MLP with three saved "training checkpoints" (random state dicts in
``tmp_path``): ``data_audit`` must add ``checkpoint_loss``, each example's mean loss over
the checkpoints (recomputed here by hand, one example at a time), rank ``suspicion`` by it,
and cache it per shard under the checkpoints' fingerprint; without checkpoints the column is
absent. Building the memorizing workload writes nothing.
"""

from __future__ import annotations

import io

import dagster as dg
import numpy as np
import torch
import torch.nn.functional as F

from influence_pipeline.cli import run_pipeline
from influence_pipeline.defs import build_definitions
from influence_pipeline.examples.digits_memorizing import memorizing_workload
from influence_pipeline.store import InfluenceStore
from influence_pipeline.workload import InMemoryShards, MethodSpec, ShardData, Workload

D, C = 4, 3


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Tanh(), torch.nn.Linear(5, C))


def model_factory() -> torch.nn.Module:
    return mlp().double()


def shard(n: int, seed: int, first_id: int) -> ShardData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    return ShardData(x, y, torch.arange(first_id, first_id + n))


def make_workload(tmp_path, name: str, checkpoints: list | None) -> Workload:
    shards = {"shard-0": shard(9, 1, 0), "shard-1": shard(7, 2, 100)}
    test = shard(4, 3, 1000)
    return Workload(
        name=name,
        model_factory=model_factory,
        checkpoint=tmp_path / "ckpt-2.pt",
        checkpoints=(lambda: checkpoints) if checkpoints is not None else None,
        loss=F.cross_entropy,
        shards=InMemoryShards(shards),
        test_sets={"heldout": lambda: test},
        method=MethodSpec(method="direct", regularization=1e-2),
        batch_size=8,
        store=str(tmp_path / f"store-{name}"),
    )


def run(workload: Workload) -> None:
    defs = build_definitions(workload, gpu=False)
    with dg.instance_for_test() as instance:
        log = io.StringIO()
        result = run_pipeline(defs, instance, ["heldout"], out=log)
        assert result.success, log.getvalue()


def test_audit_ranks_by_the_mean_loss_over_checkpoints(tmp_path):
    paths = []
    for i in range(3):
        torch.manual_seed(10 + i)
        path = tmp_path / f"ckpt-{i}.pt"
        torch.save(model_factory().state_dict(), path)
        paths.append(path)
    workload = make_workload(tmp_path, "with-checkpoints", paths)
    run(workload)
    store = InfluenceStore(tmp_path / "store-with-checkpoints", mode="r")
    audit = store.read_table("audit/latest")

    # independent: the mean over checkpoints of each example's own cross-entropy
    expected = {}
    for name in workload.shards.names():
        data = workload.shards.load(name)
        total = np.zeros(len(data))
        for path in paths:
            model = model_factory()
            model.load_state_dict(torch.load(path, weights_only=True))
            with torch.no_grad():
                for i in range(len(data)):
                    total[i] += F.cross_entropy(model(data.x[i : i + 1]), data.y[i : i + 1]).item()
        expected.update(zip(data.ids.tolist(), total / len(paths), strict=True))
    got = audit.set_index("train_id").checkpoint_loss
    assert len(got) == 16 and got.notna().all()
    want = np.array([expected[i] for i in got.index])
    np.testing.assert_allclose(got.to_numpy(dtype=np.float64), want, rtol=1e-10, atol=1e-12)
    # suspicion 1 = the highest checkpoint loss; the final checkpoint's loss orders otherwise
    ordered = audit.sort_values("suspicion")
    assert ordered.suspicion.tolist() == list(range(1, 17))
    assert np.all(np.diff(ordered.checkpoint_loss.to_numpy(dtype=np.float64)) <= 0)
    assert not np.all(np.diff(ordered.loss.to_numpy(dtype=np.float64)) <= 0)

    # cached per shard, keyed by the data and the checkpoints' fingerprints
    cached = store.read_example_values("checkpoint_loss", "shard-1")
    assert cached is not None
    values, attrs = cached
    assert attrs["checkpoints"] and attrs["data_fingerprint"]
    np.testing.assert_allclose(
        values["checkpoint_loss"], [expected[i] for i in range(100, 107)], rtol=1e-10
    )


def test_without_checkpoints_the_column_is_absent(tmp_path):
    torch.manual_seed(12)
    torch.save(model_factory().state_dict(), tmp_path / "ckpt-2.pt")
    run(make_workload(tmp_path, "no-checkpoints", None))
    audit = InfluenceStore(tmp_path / "store-no-checkpoints", mode="r").read_table("audit/latest")
    assert "checkpoint_loss" not in audit.columns
    ordered = audit.sort_values("suspicion")  # by the leave-one-out loss then
    assert len(ordered) == 16
    assert np.all(np.diff(ordered.loo_loss.to_numpy(dtype=np.float64)) <= 0)


def test_missing_checkpoint_is_named(tmp_path):
    workload = make_workload(tmp_path, "missing", [tmp_path / "nope.pt"])
    try:
        workload.checkpoint_paths()
    except ValueError as error:
        assert "nope.pt" in str(error) and "do not exist" in str(error)
    else:
        raise AssertionError("a missing checkpoint was accepted")


def test_memorizing_workload_writes_nothing_when_built(tmp_path):
    workload = memorizing_workload(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert workload.checkpoints is not None
    assert sorted(workload.test_sets) == ["holdout", "validation"]
    assert list(tmp_path.iterdir()) == []
