"""EK-FAC with the empirical Fisher and explicit damping against an independent brute force
built from Kronfluence's definitions (expand covariances over (example, position) rows, the
eigenvalue correction from per-example gradients), on a small causal transformer, a small
CNN and ``nn.TransformerEncoderLayer``: per-query Pearson ≥ 0.999 and, in float64, the
scores themselves to 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import EkfacInfluence

from .ekfac_brute import (
    TinyGPT,
    dense_scores,
    kronfluence_ekfac,
    pearson_per_row,
    per_example_matrices,
    rel,
    sequence_loss,
)

DT = torch.float64
LAM = 1e-2


class EncoderClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.encoder = torch.nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def transformer_case():
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (14, 6), generator=torch.Generator().manual_seed(1))
    return TinyGPT().to(DT).eval(), tokens[:, :5], tokens[:, 1:], sequence_loss


def cnn_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(14, 1, 6, 6, generator=gen, dtype=DT)
    return model.to(DT).eval(), x, torch.randint(0, 4, (14,), generator=gen), F.cross_entropy


def encoder_case():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(14, 4, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (14,), generator=gen)
    return EncoderClassifier().to(DT).eval(), x, y, F.cross_entropy


@pytest.mark.parametrize("case", [transformer_case, cnn_case, encoder_case])
def test_empirical_ekfac_matches_kronfluence_definitions(case):
    model, x, y, loss = case()
    train, test = slice(0, 10), slice(10, 14)
    influence = EkfacInfluence(
        model, update_diagonal=True, hessian_regularization=LAM, fisher="empirical", loss=loss
    ).fit(DataLoader(TensorDataset(x[train], y[train]), batch_size=4))
    names = influence.modules
    inverses = kronfluence_ekfac(model, loss, x[train], y[train], names, LAM)
    expected = dense_scores(
        per_example_matrices(model, loss, x[test], y[test], names),
        per_example_matrices(model, loss, x[train], y[train], names),
        inverses,
    )
    scores = influence.influences(x[test], y[test], x[train], y[train])
    assert bool((pearson_per_row(scores, expected) >= 0.999).all())
    assert rel(scores, expected) < 1e-6


def test_encoder_layer_leaves_out_what_it_cannot_factor():
    model, *_ = encoder_case()
    influence = EkfacInfluence(model)
    assert influence.modules == ["embed", "encoder.linear1", "encoder.linear2", "head"]
    # MultiheadAttention uses out_proj's weight without calling it; LayerNorms are not layers
    assert "encoder.self_attn.out_proj.weight" in influence.excluded_parameters
    assert "encoder.self_attn.in_proj_weight" in influence.excluded_parameters
    assert "encoder.norm1.weight" in influence.excluded_parameters
