"""EK-FAC's bad inputs: each refused with a message that names the problem and the way out."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    EkfacInfluence,
    NotImplementedLayerRepresentationException,
)

DT = torch.float64


def loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_no_supported_layer_names_the_trainable_modules():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.LayerNorm(3))
    with pytest.raises(
        NotImplementedLayerRepresentationException, match=r"0 \(Embedding\), 1 \(LayerNorm\)"
    ):
        EkfacInfluence(model)


def test_modules_selection_errors_and_choices():
    model = torch.nn.Sequential(
        torch.nn.Embedding(5, 3), torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        EkfacInfluence(model, modules=["nope"])
    with pytest.raises(ValueError, match="type Embedding"):
        EkfacInfluence(model, modules=[torch.nn.Embedding])
    with pytest.raises(NotImplementedLayerRepresentationException, match="'2'"):
        EkfacInfluence(model, modules=["2"])
    assert EkfacInfluence(model, modules=["3"]).modules == ["3"]
    assert EkfacInfluence(model, modules=[torch.nn.Linear]).modules == ["1", "3"]
    chosen = EkfacInfluence(model, modules=[""])  # the root: every layer inside it
    assert chosen.modules == ["1", "3"]
    assert chosen.excluded_parameters == ["0.weight"]


def test_fisher_arguments_are_checked():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="fisher must be one of"):
        EkfacInfluence(model, fisher="true")
    with pytest.raises(ValueError, match="fisher_samples must be a positive integer"):
        EkfacInfluence(model, fisher="sampled", fisher_samples=0)


def test_exact_fisher_with_a_large_output_suggests_sampled():
    model = torch.nn.Linear(3, 400).to(DT)  # (B, 4, 3) → (B, 4, 400): 1,600 outputs
    x = torch.randn(6, 4, 3, dtype=DT)
    y = torch.randint(0, 400, (6, 4))
    with pytest.raises(ValueError, match=r"1600 per example.*fisher='sampled'"):
        EkfacInfluence(model, hessian_regularization=0.1).fit(loader(x, y))
    sampled = EkfacInfluence(model, hessian_regularization=0.1, fisher="sampled", seed=0)
    assert sampled.fit(loader(x, y)).influences(x[:2], y[:2], x, y).shape == (2, 6)


def test_nan_in_activations_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(8, 3)
    x[5, 1] = float("nan")
    with pytest.raises(ValueError, match="inputs of layer '0' contain NaN"):
        EkfacInfluence(model, hessian_regularization=0.1).fit(loader(x, torch.zeros(8).long()))


def test_sequence_layout_must_be_batch_first():
    class TimeFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) → (T, B, d) inside
            return self.head(self.inner(x.transpose(0, 1)).transpose(0, 1))

    x, y = torch.randn(8, 3, 4), torch.randint(0, 3, (8, 3))
    with pytest.raises(ValueError, match=r"Layer 'inner' .*\(3, 4, 4\).*batch_first=True"):
        EkfacInfluence(TimeFirst(), hessian_regularization=0.1).fit(loader(x, y))


def test_layer_not_called_through_its_forward_is_reported():
    class Direct(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(3, 3)
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x @ self.inner.weight.T)

    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match=r"\['inner'\] were not called"):
        EkfacInfluence(Direct(), hessian_regularization=0.1).fit(loader(x, y))


def test_flat_factors_of_the_wrong_width_are_refused():
    model = torch.nn.Linear(3, 2).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,))
    influence = EkfacInfluence(model, hessian_regularization=0.1).fit(loader(x, y))
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        influence.influences_from_factors(torch.zeros(2, 5, dtype=DT), x, y)
