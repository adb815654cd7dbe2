"""A tiny Hugging Face GPT-2 (``transformers``, the ``hf`` extra) end to end through the
assets: its ``Conv1D`` layers factored by EK-FAC with the empirical Fisher, rank-r query
factors in the store, every asset and check green, and the stored scores equal to the
engine's on the same fitted state."""

from __future__ import annotations

import io

import dagster as dg
import numpy as np
import torch
import torch.nn.functional as F

from influence_pipeline.cli import run_pipeline
from influence_pipeline.defs import build_definitions
from influence_pipeline.store import InfluenceStore
from influence_pipeline.workload import InMemoryShards, MethodSpec, ShardData, Workload

VOCAB, SEQ = 13, 6


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def sequences(n: int, seed: int, first_id: int) -> ShardData:
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return ShardData(tokens[:, :-1], tokens[:, 1:], torch.arange(first_id, first_id + n))


def test_hf_gpt2_runs_through_the_assets(tmp_path):
    checkpoint = tmp_path / "gpt2.pt"
    torch.save(gpt2().state_dict(), checkpoint)
    shards = {"shard-0": sequences(12, 1, 0), "shard-1": sequences(10, 2, 100)}
    test = sequences(3, 3, 1000)
    workload = Workload(
        name="hf-gpt2",
        model_factory=gpt2,
        checkpoint=checkpoint,
        loss=F.cross_entropy,
        shards=InMemoryShards(shards),
        test_sets={"heldout": lambda: test},
        method=MethodSpec(method="ekfac", regularization=1e-2, fisher="empirical", query_rank=2),
        batch_size=8,
        store=str(tmp_path / "store"),
    )
    defs = build_definitions(workload, gpu=False)
    with dg.instance_for_test() as instance:
        log = io.StringIO()
        audit = run_pipeline(defs, instance, ["heldout"], out=log)
        assert audit.success, log.getvalue()
        checks = audit.get_asset_check_evaluations()
        factors = instance.get_latest_materialization_event(
            dg.AssetKey("influence_factors")
        ).asset_materialization.metadata
    assert all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]
    assert factors["kind"].value == "query" and factors["rank"].value == 2

    # the engine on its own, the same spec and data (the empirical Fisher has no sampling)
    model = workload.load_model()
    influence = workload.method.build(model, workload.loss)
    influence.fit(workload.fit_data().fit_loader(workload.batch_size))
    assert all(".c_" in name for name in influence.modules)  # GPT-2's Conv1D layers
    queries = influence.compressed_factors(test.x, test.y, rank=2)
    store = InfluenceStore(tmp_path / "store", mode="r")
    allocation = store.allocation("heldout")["shards"]
    stored = store.scores_array("heldout")[...]
    for name, data in shards.items():
        expected = influence.influences_from_factors(queries, data.x, data.y).double().numpy()
        a = allocation[name]
        got = np.asarray(stored[:, a["start"] : a["start"] + a["n_rows"]], dtype=np.float64)
        # float32 model and store: relative error < 1e-4
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
