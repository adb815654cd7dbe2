"""Quality metrics against hand-computed values and constructed rankings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from influence_pipeline.quality import (
    average_precision,
    average_ranks,
    flag_quality,
    fraction_found,
    spearman,
)


def test_average_ranks_share_ties() -> None:
    np.testing.assert_allclose(average_ranks(np.array([10.0, 3.0, 3.0, 7.0, 3.0])), [5, 2, 2, 4, 2])


def test_spearman_hand_computed_with_ties() -> None:
    # ranks a = [1, 2.5, 2.5, 4], b = [3, 1, 2, 4]; centred dot 1.5, norms² 4.5 and 5:
    # ρ = 1.5 / sqrt(22.5) = 1 / sqrt(10)
    rho = spearman(np.array([1.0, 2.0, 2.0, 4.0]), np.array([3.0, 1.0, 2.0, 5.0]))
    assert rho == pytest.approx(1 / math.sqrt(10), abs=1e-12)


def test_spearman_rowwise_monotone_and_constant() -> None:
    a = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = np.array([[10.0, 20.0, 300.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    rho = spearman(a, b)
    np.testing.assert_allclose(rho[:2], [1.0, -1.0], atol=1e-12)
    assert np.isnan(rho[2])


def test_spearman_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"one shape.*\(3,\).*\(4,\)"):
        spearman(np.zeros(3), np.zeros(4))


def _flips(n: int = 1000, n_bad: int = 10) -> np.ndarray:
    corrupted = np.zeros(n, dtype=bool)
    corrupted[np.random.default_rng(0).choice(n, n_bad, replace=False)] = True
    return corrupted


def test_all_flips_first_finds_everything() -> None:
    corrupted = _flips()
    scores = corrupted.astype(float) + np.random.default_rng(1).uniform(0, 0.5, len(corrupted))
    assert fraction_found(scores, corrupted) == {0.01: 1.0, 0.05: 1.0, 0.1: 1.0, 0.2: 1.0}
    assert average_precision(scores, corrupted) == pytest.approx(1.0)


def test_reversed_ranking_finds_nothing_at_small_fractions() -> None:
    corrupted = _flips()
    scores = -corrupted.astype(float)
    assert fraction_found(scores, corrupted) == {0.01: 0.0, 0.05: 0.0, 0.1: 0.0, 0.2: 0.0}
    # the flips sit at ranks 991..1000: AP = mean of k / (990 + k)
    expected = np.mean([k / (990 + k) for k in range(1, 11)])
    assert average_precision(scores, corrupted) == pytest.approx(expected, abs=1e-12)


def test_fraction_found_counts_the_top_slice() -> None:
    # 20 examples, 4 corrupted at ranks 1, 3, 6, 15: top 5 % = 1 example, 10 % = 2, 20 % = 4
    corrupted = np.zeros(20, dtype=bool)
    corrupted[[0, 2, 5, 14]] = True
    scores = -np.arange(20.0)
    assert fraction_found(scores, corrupted, (0.05, 0.1, 0.2, 0.5)) == {
        0.05: 0.25,
        0.1: 0.25,
        0.2: 0.5,
        0.5: 0.75,
    }
    assert average_precision(scores, corrupted) == pytest.approx(
        (1 / 1 + 2 / 3 + 3 / 6 + 4 / 15) / 4, abs=1e-12
    )


def test_random_ranking_finds_about_its_fraction() -> None:
    corrupted = _flips(20_000, 2_000)
    scores = np.random.default_rng(3).normal(size=len(corrupted))
    found = fraction_found(scores, corrupted)
    for f, value in found.items():
        assert value == pytest.approx(f, abs=0.03)


def test_flag_quality() -> None:
    corrupted = np.array([True, True, False, False, True])
    flag = np.array([True, False, True, False, True])
    quality = flag_quality(flag, corrupted)
    assert (quality.precision, quality.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert quality.to_json()["true_positives"] == 2


def test_metric_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="corrupted marks no example"):
        fraction_found(np.zeros(5), np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="fractions must lie in"):
        fraction_found(np.arange(5.0), np.ones(5, dtype=bool), (1.5,))
    with pytest.raises(ValueError, match="scores contain NaN"):
        average_precision(np.array([np.nan, 1.0]), np.array([True, False]))
