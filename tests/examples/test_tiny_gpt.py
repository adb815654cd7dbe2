"""The GPT example: corpus and tokenizer, the causal model, training and its cache, and a
tiny configuration end to end through EK-FAC, stored query factors and the shard writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_pipeline.examples import tiny_gpt as g

TINY = g.GPTConfig(seq_len=16, d_model=32, n_layers=1, n_heads=2)


@pytest.fixture(scope="module")
def text() -> str:
    return g.load_corpus(max_bytes=4000)


@pytest.fixture(scope="module")
def sequences(text):
    return g.build_sequences(text, seq_len=16, n_test=4, seed=0)


@pytest.fixture(scope="module")
def model(sequences):
    return g.train(sequences, TINY, g.TrainConfig(steps=30, batch_size=16, lr=1e-2))


def test_corpus_and_sequences_are_deterministic_and_decode_to_the_text(text, sequences):
    assert g.load_corpus(max_bytes=4000) == text
    assert text.isascii() and len(text) == 4000
    assert g.decode(g.encode(text)) == text
    s = sequences
    n = (len(text) - 1) // 16
    assert len(s.x_train) + len(s.x_test) == n and len(s.x_test) == 4
    assert not set(s.train_ids.tolist()) & set(s.test_ids.tolist())
    torch.testing.assert_close(s.x_train[:, 1:], s.y_train[:, :-1])  # y is x shifted by one
    for i in (0, 7):
        assert g.decode(s.x_train[i]) == g.window_text(text, int(s.train_ids[i]), 16)
    again = g.build_sequences(text, seq_len=16, n_test=4, seed=0)
    torch.testing.assert_close(again.test_ids, s.test_ids)
    with pytest.raises(ValueError, match="n_test=1000 needs"):
        g.build_sequences(text, seq_len=16, n_test=1000)


def test_the_default_model_is_gpt_sized_and_the_model_is_causal():
    assert g.n_parameters(g.TinyGPT()) >= 2_000_000
    torch.manual_seed(0)
    net = g.TinyGPT(TINY).eval()
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        before, after = net(x), net(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])  # the past ignores the future
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    with pytest.raises(ValueError, match="integer token ids"):
        net(x.float())
    with pytest.raises(ValueError, match="exceed the model's seq_len 16"):
        net(torch.zeros(1, 17, dtype=torch.int64))


def test_training_lowers_the_loss_and_the_checkpoint_is_cached(
    sequences, model, tmp_path, monkeypatch
):
    s = sequences
    torch.manual_seed(0)
    untrained = g.mean_token_loss(g.TinyGPT(TINY).eval(), s.x_train, s.y_train)
    assert untrained > 5.0  # ln 256 = 5.55 at initialisation
    assert g.mean_token_loss(model, s.x_train, s.y_train) < untrained - 1.5
    budget = g.TrainConfig(steps=2, batch_size=4)
    path = g.cached_checkpoint(s, "digest", TINY, budget, cache_dir=tmp_path)
    monkeypatch.setattr(g, "train", lambda *a, **k: pytest.fail("trained again"))
    assert g.cached_checkpoint(s, "digest", TINY, budget, cache_dir=tmp_path) == path
    restored = g.load_model(path, TINY)
    assert not restored.training


def test_tiny_config_end_to_end_through_the_store(text, sequences, model, tmp_path):
    s = sequences
    # one held-out window also appears among the training windows: it should top its list
    x_train = torch.cat([s.x_train, s.x_test[:1]])
    y_train = torch.cat([s.y_train, s.y_test[:1]])
    ids = torch.cat([s.train_ids, s.test_ids[:1]])
    data = g.Sequences(x_train, y_train, ids, s.x_test, s.y_test, s.test_ids, s.seq_len)
    config = g.AttributionConfig(fisher="sampled", rank=2, n_shards=2, top_k=3, batch_size=32)
    store = g.attribute(model, data, tmp_path / "store", config)
    status = store.status("heldout")["heldout"]
    assert status["complete"] == ["shard-0", "shard-1"] and status["factors"]
    record = store.factors_record("heldout")
    assert record["kind"] == "query" and record["rank"] == 2 and record["fisher"] == "sampled"
    # rank-2 factors of the 32-wide layers are smaller than the dense factors
    assert record["nbytes"] < len(s.x_test) * record["n_parameters"] * 4
    # the stored scores equal the engine's, from the stored block mapper
    influence = store.load_block_mapper(model)
    queries = influence.compressed_factors(s.x_test, s.y_test, rank=2)
    expected = influence.influences_from_factors(queries, x_train, y_train).numpy()
    per_layer = influence.influences_from_factors_by_layer(queries, x_train, y_train)
    assert list(per_layer) == influence.modules and len(per_layer) == 5  # qkv, proj, fc, out, head
    np.testing.assert_allclose(sum(per_layer.values()).numpy(), expected, rtol=1e-4, atol=1e-6)
    allocation = store.allocation("heldout")["shards"]
    array = store.scores_array("heldout")[...]
    got = np.concatenate(
        [array[:, a["start"] : a["start"] + a["n_rows"]] for a in allocation.values()], axis=1
    )
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
    top = store.top_k("heldout", k=3)
    first = top[(top.test_id == int(s.test_ids[0])) & (top.kind == "helpful")]
    assert int(first.sort_values("rank").train_id.iloc[0]) == int(s.test_ids[0])
    report = g.describe_top_k(top, text, s.seq_len, k=2)
    query_text = g.window_text(text, int(s.test_ids[0]), 16).replace("\n", "⏎")
    assert f"query {int(s.test_ids[0])}: {query_text!r}" in report
    assert report.count("helpful #1") == 4 and report.count("helpful #2") == 4


def test_the_workload_writes_nothing_until_used_and_builds_a_sampled_fisher_ekfac(tmp_path):
    workload = g.tiny_gpt_workload(
        tmp_path / "data",
        n_shards=2,
        n_test=4,
        store=str(tmp_path / "store"),
        config=TINY,
        budget=g.TrainConfig(steps=2, batch_size=4),
        max_bytes=4000,
        cache_dir=tmp_path / "cache",
    )
    assert not any(tmp_path.iterdir())  # building it wrote nothing
    assert workload.shards.names() == ["shard-0", "shard-1"]
    heldout = workload.test_set("heldout")
    assert tuple(heldout.x.shape) == (4, 16) and heldout.x.dtype == torch.int64
    model = workload.load_model()
    influence = workload.method.build(model, workload.loss)
    assert influence.fisher == "sampled" and influence.modules == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.fc",
        "blocks.0.out",
        "head",
    ]
