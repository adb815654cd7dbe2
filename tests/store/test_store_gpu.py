"""Shard scoring with the influence model on CUDA writes the CPU's scores (skipped only
where torch sees no GPU; the same writer runs on the CPU in test_store.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_pipeline.store import InfluenceStore

from . import workload as w


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_on_cuda_writes_the_cpu_scores(tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        store, _ = w.prepare(str(tmp_path / device))
        influence = InfluenceStore(str(tmp_path / device)).load_block_mapper(w.model().to(device))
        assert influence.model_device.type == device
        store.write_shard_scores("val", "shard-3", influence, w.shard_loader(3))
        a = store.allocation("val")["shards"]["shard-3"]
        results[device] = store.scores_array("val")[:, a["start"] : a["start"] + a["n_rows"]]
        assert store.status("val")["val"]["complete"] == ["shard-3"]
    cpu, gpu = results["cpu"], results["cuda"]
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-5
