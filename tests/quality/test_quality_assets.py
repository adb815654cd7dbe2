"""The on-demand quality assets materialize on a tiny workload: retraining fans out over
partitions and is reused, the LDS / mislabel / comparison tables and metadata appear."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import torch

from influence_pipeline.defs.quality import QualitySettings, QualityTables, build_quality_assets
from influence_pipeline.defs.resources import InfluenceStoreResource
from influence_pipeline.workload import InMemoryShards, MethodSpec, ShardData, Workload

DIM, CLASSES, N = 4, 3, 48


def _fit(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
    """Weight-decayed logistic regression by plain gradient descent (no torch.optim)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(DIM, CLASSES).double()
    for _ in range(200):
        penalty = sum((p * p).sum() for p in model.parameters())
        loss = torch.nn.functional.cross_entropy(model(x), y) + 0.05 * penalty
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= 0.5 * g
    return model.eval()


def _workload(tmp_path: Path) -> Workload:
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(N + 24) % CLASSES
    x = 3.0 * torch.eye(CLASSES, DIM, dtype=torch.float64)[y]
    x = x + torch.randn(len(y), DIM, generator=generator, dtype=torch.float64)
    y_train = y[:N].clone()
    y_train[[0, 7, 20]] = (y_train[[0, 7, 20]] + 1) % CLASSES  # three known flips
    ids = torch.arange(N)
    shards = {
        "a": ShardData(x[: N // 2], y_train[: N // 2], ids[: N // 2]),
        "b": ShardData(x[N // 2 : N], y_train[N // 2 :], ids[N // 2 :]),
    }
    checkpoint = tmp_path / "model.pt"
    torch.save(_fit(x[:N], y_train, 0).state_dict(), checkpoint)
    test = ShardData(x[N:], y[N:], torch.arange(1000, 1000 + 24))
    return Workload(
        name="tiny",
        model_factory=lambda: torch.nn.Linear(DIM, CLASSES).double(),
        checkpoint=checkpoint,
        loss=torch.nn.functional.cross_entropy,
        shards=InMemoryShards(shards),
        test_sets={"test": lambda: test},
        method=MethodSpec("direct", 0.1),
        store=str(tmp_path / "store"),
        known_mislabeled=lambda: [0, 7, 20],
    )


def test_quality_assets_materialize_and_reuse(tmp_path: Path) -> None:
    workload = _workload(tmp_path)
    settings = QualitySettings(
        n_subsets=6,
        n_partitions=2,
        methods={"direct": MethodSpec("direct", 0.1), "ihm": MethodSpec("ihm", 0.1)},
        mislabel_methods=("direct",),
    )
    assets = build_quality_assets(workload, lambda x, y, seed: _fit(x, y, seed), settings)
    resources = {"store": InfluenceStoreResource(root=workload.store)}
    with dg.instance_for_test() as instance:
        for key in ("part-00", "part-01"):
            result = dg.materialize(
                assets,
                selection=["quality_retrained"],
                partition_key=key,
                resources=resources,
                instance=instance,
            )
            meta = result.get_asset_materialization_events()[0].materialization.metadata
            assert meta["reused"].value is False and meta["retrained_models"].value == 6
        again = dg.materialize(
            assets,
            selection=["quality_retrained"],
            partition_key="part-01",
            resources=resources,
            instance=instance,
        )
        assert (
            again.get_asset_materialization_events()[0].materialization.metadata["reused"].value
            is True
        )
        reports = dg.materialize(
            assets,
            selection=["attribution_lds", "mislabel_metrics", "methods_comparison"],
            resources=resources,
            instance=instance,
        )
        assert reports.success
        events = {
            e.asset_key.path[-1]: e.materialization.metadata
            for e in reports.get_asset_materialization_events()
        }
    tables = QualityTables(resources["store"])
    lds_table = tables.read("lds")
    assert lds_table is not None
    assert list(lds_table.method) == ["direct", "ihm", "retrain, another seed (ceiling)"]
    assert np.isfinite(lds_table.lds).all() and (lds_table.lds.abs() <= 1).all()
    assert lds_table.loc[0, "pearson_vs_direct"] == 1.0
    assert (lds_table.fit_s.iloc[:2] >= 0).all()
    mislabel = tables.read("mislabel")
    assert mislabel is not None
    assert {"loss", "self_influence:direct", "loo_loss", "audit suspicion", "random"} <= set(
        mislabel.ranking
    )
    assert ((mislabel.ap > 0) & (mislabel.ap <= 1)).all()
    methods = tables.read("methods")
    assert methods is not None
    assert "mislabel_ap" in methods and np.isfinite(methods.mislabel_ap.iloc[0])
    assert "data:image/png;base64" in events["mislabel_metrics"]["summary"].value
    assert "data:image/png;base64" in events["attribution_lds"]["summary"].value
    assert "12 retrained models" in events["attribution_lds"]["summary"].value
