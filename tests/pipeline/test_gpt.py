"""The GPT example through the assets: EK-FAC with the sampled Fisher and rank-r query
factors, materialized end to end on a temporary instance (a tiny transformer, 2 shards,
4 held-out sequences); stored scores equal the engine's; bad method settings refused."""

from __future__ import annotations

import dataclasses
import io

import dagster as dg
import numpy as np
import pytest
import torch

from influence_pipeline.cli import run_pipeline
from influence_pipeline.defs import JOB_OF, build_definitions
from influence_pipeline.defs.config import validate_run_config
from influence_pipeline.examples import tiny_gpt as g
from influence_pipeline.store import InfluenceStore
from influence_pipeline.workload import MethodSpec

TINY = g.GPTConfig(seq_len=16, d_model=32, n_layers=1, n_heads=2)
RANK = 2


def test_tiny_gpt_runs_through_the_assets_with_query_factors(tmp_path):
    torch.manual_seed(0)
    workload = g.tiny_gpt_workload(
        tmp_path / "data",
        n_shards=2,
        n_test=4,
        store=str(tmp_path / "store"),
        config=TINY,
        budget=g.TrainConfig(steps=20, batch_size=8, lr=1e-2),
        max_bytes=3000,
        cache_dir=tmp_path / "cache",
        query_rank=RANK,
    )
    assert workload.method.fisher == "sampled" and workload.method.query_rank == RANK
    defs = build_definitions(workload)
    with dg.instance_for_test() as instance:
        log = io.StringIO()
        audit = run_pipeline(defs, instance, ["heldout"], out=log)
        assert audit.success, log.getvalue()
        factors = instance.get_latest_materialization_event(
            dg.AssetKey("influence_factors")
        ).asset_materialization.metadata
        table = instance.get_latest_materialization_event(
            dg.AssetKey("influence_table")
        ).asset_materialization.metadata
        checks = audit.get_asset_check_evaluations()
    assert factors["kind"].value == "query" and factors["rank"].value == RANK
    assert factors["fisher"].value == "sampled"
    assert factors["nbytes"].value < factors["dense_nbytes"].value
    preview = table["preview"].value
    assert "Most influential training examples of the first 4 test points" in preview
    assert preview.count("helpful #1 (window") == 4
    assert all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]

    # the engine on its own: the same spec fitted on the same data, rank-2 query factors
    model = workload.load_model()
    influence = workload.method.build(model, workload.loss)
    influence.fit(workload.fit_data().fit_loader(workload.batch_size))
    test = workload.test_set("heldout")
    queries = influence.compressed_factors(test.x, test.y, rank=RANK)
    store = InfluenceStore(tmp_path / "store", mode="r")
    assert store.factors_record("heldout")["modules"] == influence.modules
    allocation = store.allocation("heldout")["shards"]
    array = store.scores_array("heldout")[...]
    for shard in workload.shards.names():
        data = workload.shards.load(shard)
        expected = influence.influences_from_factors(queries, data.x, data.y).double().numpy()
        a = allocation[shard]
        got = np.asarray(array[:, a["start"] : a["start"] + a["n_rows"]], dtype=np.float64)
        # float32 model and store, the same seeded sampled Fisher: relative error < 1e-4
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
    losses = store.read_table("audit/latest").set_index("train_id").loss
    x, y = data.x[:2], data.y[:2]
    with torch.no_grad():
        summed = torch.nn.functional.cross_entropy(
            model(x).reshape(-1, 256), y.reshape(-1), reduction="none"
        )
    expected_loss = summed.reshape(2, -1).sum(1).double().numpy()  # summed over positions
    np.testing.assert_allclose(
        losses.loc[data.ids[:2].numpy()].to_numpy(), expected_loss, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "cg", "fisher": "sampled"}, "fisher='sampled' only apply to method='ekfac'"),
        ({"method": "direct", "query_rank": 8}, "query_rank=8 only apply to method='ekfac'"),
        ({"method": "ekfac", "fisher": "sampeld"}, "fisher='sampeld' is not one of exact"),
        ({"method": "ekfac", "fisher_samples": 0}, "fisher_samples must be an integer >= 1"),
        ({"method": "ekfac", "query_rank": 0}, "query_rank must be None (dense factors)"),
        ({"method": "ekfac", "modules": "head"}, "modules must be None or a list"),
        ({"method": "ekfac", "options": {"fisher": "sampled"}}, "are MethodSpec fields"),
    ],
)
def test_bad_ekfac_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=None) as error:
        MethodSpec(**kwargs)
    assert message in str(error.value)


def test_ekfac_settings_are_in_the_digest_and_the_launchpad_config(tmp_path):
    base = MethodSpec(method="ekfac")
    assert base.digest() != MethodSpec(method="ekfac", query_rank=4).digest()
    assert base.digest() != MethodSpec(method="ekfac", fisher="empirical").digest()
    assert base.digest() != MethodSpec(method="ekfac", modules=["head"]).digest()
    workload = g.tiny_gpt_workload(tmp_path / "data", store=str(tmp_path / "s"), config=TINY)
    defs = build_definitions(workload)
    good = {"fisher": "empirical", "query_rank": 4, "modules": ["head"], "fisher_samples": 2}
    config = {"ops": {"block_mapper": {"config": good}}}
    validate_run_config(defs, JOB_OF["block_mapper"], config, workload.method)
    for bad, message in (
        ({"fisher": "sampeld"}, "block_mapper.fisher='sampeld' is not one of exact, sampled"),
        ({"query_rank": 0}, "block_mapper.query_rank: Input should be greater than or equal"),
    ):
        with pytest.raises(ValueError) as error:
            validate_run_config(
                defs,
                JOB_OF["block_mapper"],
                {"ops": {"block_mapper": {"config": bad}}},
                workload.method,
            )
        assert message in str(error.value)
    assert not any(tmp_path.iterdir())  # building and validating wrote nothing


def test_a_failed_run_prints_the_step_error_not_a_check_error(tmp_path):
    workload = g.tiny_gpt_workload(tmp_path / "data", store=str(tmp_path / "s"), config=TINY)
    missing = tmp_path / "missing.pt"
    defs = build_definitions(dataclasses.replace(workload, checkpoint=missing))
    log = io.StringIO()
    with dg.instance_for_test() as instance, pytest.raises(SystemExit):
        run_pipeline(defs, instance, ["heldout"], out=log)
    assert "block_mapper" in log.getvalue() and "FAILED" in log.getvalue()
    assert f"The checkpoint {missing} of workload 'tiny-gpt' does not exist." in log.getvalue()
