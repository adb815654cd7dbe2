"""The scoring asset on CUDA gives the CPU's scores (skipped only where torch sees no GPU;
the same code path runs on the CPU in every other pipeline test)."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import torch

from influence_pipeline.store import InfluenceStore

from .conftest import make_setup


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_on_cuda_matches_cpu(tmp_path, model_cache):
    arrays = {}
    with dg.instance_for_test() as instance:
        for device in ("cpu", "cuda"):
            s = make_setup(tmp_path / device, model_cache, instance)
            s.register()
            cpu = {"config": {"device": "cpu"}}
            s.materialize("block_mapper", run_config={"ops": {"block_mapper": cpu}})
            s.materialize(
                "influence_factors", "validation", run_config={"ops": {"influence_factors": cpu}}
            )
            result = s.materialize(
                "influence_scores",
                "validation|shard-1",
                run_config={"ops": {"influence_scores": {"config": {"device": device}}}},
            )
            meta = result.get_asset_materialization_events()[0].materialization.metadata
            assert meta["device"].value.startswith(device)
            assert all(c.passed for c in result.get_asset_check_evaluations())
            store = InfluenceStore(s.workload.store, mode="r")
            a = store.allocation("validation")["shards"]["shard-1"]
            arrays[device] = store.scores_array("validation")[
                :, a["start"] : a["start"] + a["n_rows"]
            ]
    cpu, gpu = arrays["cpu"], arrays["cuda"]
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-4
