"""Self-influence ⟨A⁻¹gᵢ, gᵢ⟩ equals the diagonal of the symmetric training influences
I(z_train, z_train) for every method (tiny classifier, float64)."""

from __future__ import annotations

import pytest
import torch

from influence_pipeline.workload import METHODS, MethodSpec

OPTIONS: dict[str, dict[str, object]] = {
    "cg": {"rtol": 1e-12, "maxiter": 200},
    "lissa": {"seed": 0, "maxiter": 100, "warn_on_max_iteration": False},
    "arnoldi": {"seed": 0, "krylov_dimension": 20},
    "nystroem": {"seed": 0},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_self_influence_is_the_diagonal(method: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    spec = MethodSpec(
        method=method,
        regularization=0.1,
        rank=6,
        second_order_mode="gauss_newton",  # positive definite at a random initialisation
        options=OPTIONS.get(method, {}),
    )
    influence = spec.build(model, torch.nn.functional.cross_entropy).fit(loader)
    matrix = influence.influences(x, y, x, y)
    assert matrix.shape == (24, 24)
    torch.testing.assert_close(
        influence.self_influences(x, y), torch.diagonal(matrix), rtol=1e-8, atol=1e-10
    )
    # the approximations of A⁻¹ are symmetric, so "the diagonal" is the same read either way;
    # CG stops at its tolerance, and LiSSA's sampled recursion is not symmetric at all
    if method != "lissa":
        tolerance = 1e-5 if method == "cg" else 1e-8
        torch.testing.assert_close(matrix, matrix.T, rtol=tolerance, atol=tolerance)
