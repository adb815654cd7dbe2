"""Compressed query factors: exact at full rank, the best rank-r approximation below it,
scored without expansion (Σ_t (Lᵀg_t)·(Rã_t)) to the same values as the expanded matrices."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import QueryFactors, per_layer

from .ekfac_brute import rel
from .test_ekfac_layers import fitted


@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_full_rank_factors_are_exact(case):
    influence, _, _, (x, y), (x_test, y_test) = fitted(case, "empirical")
    exact = influence.influences(x_test, y_test, x, y)
    for rank in (None, 64):  # 64 ≥ every layer's smaller side: kept exact
        factors = influence.compressed_factors(x_test, y_test, rank=rank)
        assert all(q.is_dense for q in factors.layers.values())
        assert rel(influence.influences_from_factors(factors, x, y), exact) < 1e-10
    smallest = min(min(q.dense.shape[-2:]) for q in factors.layers.values())
    at_edge = influence.compressed_factors(x_test, y_test, rank=smallest)
    for name, q in at_edge.layers.items():  # kept exact where factors would not be smaller
        o, i = factors.layers[name].dense.shape[-2:]
        assert q.is_dense == (smallest * (o + i) >= o * i), name
        if q.is_dense:
            assert torch.equal(q.dense, factors.layers[name].dense)


@pytest.mark.parametrize("route", ["factors", "expand", "auto"])
@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_truncated_factors_are_the_svd_truncation_scored_without_expansion(
    case, route, monkeypatch
):
    monkeypatch.setattr(per_layer, "LOW_RANK_ROUTE", route)
    influence, _, _, (x, y), (x_test, y_test) = fitted(case, "exact")
    exact = influence.compressed_factors(x_test, y_test)
    rank = 2
    low = influence.compressed_factors(x_test, y_test, rank=rank)
    truncated = [n for n, q in low.layers.items() if not q.is_dense]
    assert truncated  # some layer is larger than rank 2 on both sides
    for name, q in low.layers.items():
        m = exact.layers[name].dense
        if q.is_dense:
            assert rank * sum(m.shape[-2:]) >= m.shape[-2] * m.shape[-1]
            continue
        assert q.left.shape == (*m.shape[:-1], rank) and q.right.shape[-2:] == (rank, m.shape[-1])
        sigma = torch.linalg.svdvals(m)
        residual = (m - q.left @ q.right).norm(dim=(-2, -1))
        assert torch.allclose(residual, sigma[..., rank:].norm(dim=-1), rtol=1e-8, atol=1e-12)
    # scored through the factors (either contraction order) == through the expanded matrices
    expanded = QueryFactors(
        type(low.layers)((n, type(q)(dense=q.matrix())) for n, q in low.layers.items())
    )
    by_factors = influence.influences_from_factors_by_layer(low, x, y)
    by_dense = influence.influences_from_factors_by_layer(expanded, x, y)
    for name in truncated:
        assert rel(by_factors[name], by_dense[name]) < 1e-10, name


def test_factor_size_round_trip_and_row_blocks():
    influence, _, _, (x, y), (x_test, y_test) = fitted("gpt", "empirical")
    rank = 2
    low = influence.compressed_factors(x_test, y_test, rank=rank)
    expected_numbers = 0
    for layer in influence.active_layers.values():
        o, i, g = layer.out_features, layer.in_dim, layer.groups
        expected_numbers += g * min(o * i, rank * (o + i))
    assert low.nbytes == len(x_test) * expected_numbers * 8
    assert low.nbytes < influence.compressed_factors(x_test, y_test).nbytes

    restored = QueryFactors.from_tensors(
        {k: t.clone() for k, t in low.tensors().items()}, rank=low.rank
    )
    scores = influence.influences_from_factors(low, x, y)
    assert torch.equal(influence.influences_from_factors(restored, x, y), scores)
    head = influence.influences_from_factors(low.rows(0, 2), x, y)
    assert rel(head, scores[:2]) < 1e-12


def test_rank_below_one_and_other_modules_are_refused():
    influence, model, _, (x, y), (x_test, y_test) = fitted("cnn", "empirical")
    for rank in (0, -3, 1.5):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            influence.compressed_factors(x_test, y_test, rank=rank)
    factors = influence.compressed_factors(x_test, y_test, rank=1)
    other = type(influence)(model, hessian_regularization=0.1, modules=["0", "6"]).fit(
        DataLoader(TensorDataset(x, y), batch_size=5)
    )
    partial = QueryFactors.from_tensors(
        {k: t for k, t in factors.tensors().items() if k.startswith("0/")}
    )
    with pytest.raises(ValueError, match="other modules="):
        other.influences_from_factors(partial, x, y)


def test_low_rank_route_follows_the_multiply_add_count():
    left, right = torch.zeros(100, 1, 768, 32), torch.zeros(100, 1, 32, 768)
    one_position = torch.zeros(64, 1, 1, 768)
    long_sequence = torch.zeros(64, 1, 512, 768)
    assert per_layer.low_rank_route(left, right, one_position) == "factors"
    assert per_layer.low_rank_route(left, right, long_sequence) == "expand"
