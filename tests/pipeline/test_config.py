"""Typed run config: a typo in a choice is refused before a run starts, ranges are checked,
and one method table drives construction and restores."""

from __future__ import annotations

import dagster as dg
import pytest

from influence_pipeline.defs import MAIN_JOB, build_definitions
from influence_pipeline.defs.config import validate_run_config
from influence_pipeline.examples.digits import digits_workload
from influence_pipeline.workload import METHOD_TABLE, Method, MethodSpec, method_of_class

TYPO = {"ops": {"block_mapper": {"config": {"method": "ektac"}}}}


@pytest.fixture
def workload(tmp_path):
    return digits_workload(tmp_path / "data", n_shards=2, n_test=10, store=str(tmp_path / "s"))


def test_a_method_typo_is_refused_before_the_run_starts(workload, tmp_path):
    defs = build_definitions(workload, gpu=False)
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.DagsterInvalidConfigError, match="ektac"):
            defs.resolve_job_def(MAIN_JOB).execute_in_process(
                run_config=TYPO, instance=instance, asset_selection=[dg.AssetKey("block_mapper")]
            )
        assert instance.get_runs() == []  # no run was created
    assert not (tmp_path / "s").exists() and not (tmp_path / "data").exists()


def test_validation_names_the_choices_and_ranges_in_one_line(workload):
    defs = build_definitions(workload, gpu=False)
    bad = {
        "ops": {
            "block_mapper": {"config": {"method": "ektac", "regularization": -1.0}},
        }
    }
    with pytest.raises(ValueError) as error:
        validate_run_config(defs, MAIN_JOB, bad, workload.method)
    message = str(error.value)
    assert "\n" not in message
    assert "block_mapper.method='ektac' is not one of direct, cg, lissa, arnoldi" in message
    assert "block_mapper.regularization: Input should be greater than or equal to 0" in message
    scores = {"ops": {"influence_scores": {"config": {"top_k": 0, "device": "gpu"}}}}
    with pytest.raises(ValueError, match=r"device='gpu' is not one of auto, cpu, cuda;.*top_k"):
        validate_run_config(defs, f"{MAIN_JOB}_scores", scores, workload.method)
    good = {"ops": {"block_mapper": {"config": {"method": "cg", "regularization": 0.1}}}}
    validate_run_config(defs, MAIN_JOB, good, workload.method)  # no error


def test_method_spec_refuses_bad_values_naming_the_choices():
    with pytest.raises(ValueError, match="method='ektac' is not one of direct, cg, lissa"):
        MethodSpec(method="ektac")
    with pytest.raises(ValueError, match="block_structure='blocks' is not one of"):
        MethodSpec(block_structure="blocks")
    with pytest.raises(ValueError, match="regularization must be >= 0"):
        MethodSpec(regularization=-0.1)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        MethodSpec(rank=0)
    assert MethodSpec(method=Method.ekfac).method == "ekfac"  # enum or value alike


def test_one_method_table():
    assert {m.value for m in METHOD_TABLE} == {m.value for m in Method}
    for info in METHOD_TABLE.values():
        assert method_of_class(info.cls.__name__) is info
    streaming = {m.value for m, i in METHOD_TABLE.items() if i.streams_fit_data}
    assert streaming == {"cg", "lissa", "ihm"}
    with pytest.raises(ValueError, match="Unknown influence method class 'Nope'"):
        method_of_class("Nope")
