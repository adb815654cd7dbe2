"""Hessian products are chunked over vectors by the size of the activations they hold.

Chunking changes how many vectors share one vectorised double backward, never the
product: chunked and unchunked products agree in float64, on a CNN (large activations
per sample, so it is chunked by default) and an MLP.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import influence_pipeline.influence.gradient_provider as gradient_provider
from influence_pipeline.influence import TorchBatch, TorchGradientProvider

from .closed_forms import rel_error


def _cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 3),
    ).double()


def test_activation_elements_counts_activations_not_weights():
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(2, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3))
    provider = TorchGradientProvider(wide.double(), F.cross_entropy)
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 3, (5,))
    elements = provider.activation_elements(x, y)
    # The tanh output (200) is saved for both its own backward and the second Linear's;
    # the (200, 2) and (3, 200) weights (1,000 numbers) are not activations.
    assert 200 <= elements < 1000

    cnn = TorchGradientProvider(_cnn(), F.cross_entropy)
    images = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    # At least the convolution's output (4 x 6 x 6) and the pooled features (4 x 3 x 3).
    assert cnn.activation_elements(images, y) >= 4 * 36 + 4 * 9


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_chunked_products_equal_unchunked(kind, monkeypatch):
    torch.manual_seed(1)
    if kind == "cnn":
        model, x = _cnn(), torch.randn(6, 2, 6, 6, dtype=torch.float64)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        model, x = model.double(), torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    provider = TorchGradientProvider(model, F.cross_entropy)
    vectors = torch.randn(9, provider.n_parameters, dtype=torch.float64)
    batch = TorchBatch(x, y)
    whole = provider.hessian_prod_sum(batch, vectors)  # small: one chunk

    per_sample = provider.activation_elements(x, y)
    budget = 2 * 6 * per_sample  # two vectors per chunk
    monkeypatch.setattr(gradient_provider, "MAX_ACTIVATION_ELEMENTS", budget)
    assert provider._vector_chunks(6, 9, per_sample) == 2
    chunked = provider.hessian_prod_sum(batch, vectors)
    assert rel_error(chunked, whole) < 1e-12
    for k in (0, 8):  # each row equals its product computed alone
        alone = provider.hessian_prod_sum(batch, vectors[k : k + 1])
        assert rel_error(chunked[k], alone[0]) < 1e-12


def test_lissa_divergence_in_float32_raises_instead_of_converging():
    """A scale below the largest eigenvalue makes LiSSA diverge; in float32 the iterate's
    norm overflows before its entries do, and that must not pass as convergence."""
    from influence_pipeline.influence import LissaInfluence

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = 30 * torch.randn(20, 4), torch.randint(0, 2, (20,))
    lissa = LissaInfluence(
        model, F.cross_entropy, 0.0, maxiter=2000, scale=0.01, warn_on_max_iteration=False
    ).fit([(x, y)])
    with pytest.raises(ValueError, match="LiSSA diverged"):
        lissa.influence_factors(x[:3], y[:3])
