"""EK-FAC against the exact Fisher/Hessian where it must agree.

For a classifier with logits z and p = softmax(z), the Fisher of the model's predictive
distribution over a layer's parameters is F = (1/N) Σᵢ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ with
Jᵢ = ∂zᵢ/∂θ. For a single Linear layer with cross-entropy this is also the Hessian, and for
one sample (or identical inputs) K-FAC is exact: G ⊗ A = F. With ``update_diagonal`` the
eigenvalues equal the diagonal of F in the Kronecker eigenbasis for any data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import (
    DirectInfluence,
    EkfacInfluence,
    NotImplementedLayerRepresentationException,
    fit_ekfac_factors,
)

from .closed_forms import rel_error

DT = torch.float64


def classifier(d=4, c=3, bias=True, hidden=None, seed=0):
    torch.manual_seed(seed)
    if hidden is None:
        net = torch.nn.Sequential(torch.nn.Linear(d, c, bias=bias))
    else:
        net = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, c, bias=bias)
        )
    return net.to(DT)


def data(n, d=4, c=3, seed=1, identical=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=DT)
    if identical:
        x = x[:1].expand(n, d).clone()
    y = torch.randint(0, c, (n,), generator=gen)
    return x, y


def exact_fisher(net, x, names):
    """(1/N) Σᵢ Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ over the named parameters, flat order."""
    params = {n: p.detach() for n, p in net.named_parameters()}

    def logits(sub, xi):
        return torch.func.functional_call(net, {**params, **sub}, (xi[None],))[0]

    sub = {n: params[n] for n in names}
    total = 0
    for xi in x:
        jac = torch.func.jacrev(logits)(sub, xi)
        J = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)
        p = torch.softmax(logits(sub, xi), dim=0)
        total = total + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return total / len(x)


def to_v_layout(matrix, out, inp, bias):
    """Reorder a curvature over [vec(W), b] to the row-major layout of V = [W | b]."""
    idx = []
    for o in range(out):
        idx.extend(o * inp + j for j in range(inp))
        if bias:
            idx.append(out * inp + o)
    idx = torch.tensor(idx)
    return matrix[idx][:, idx]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("update_diagonal", [False, True])
@pytest.mark.parametrize("identical", [False, True])
def test_single_layer_where_kfac_is_exact(bias, update_diagonal, identical):
    net = classifier(bias=bias)
    n = 6 if identical else 1
    x, y = data(n, identical=identical)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    lam = 0.1
    ekfac = EkfacInfluence(net, update_diagonal=update_diagonal, hessian_regularization=lam)
    ekfac.fit(loader)
    direct = DirectInfluence(net, F.cross_entropy, regularization=lam).fit(loader)
    x_test, y_test = data(5, seed=7)
    assert (
        rel_error(ekfac.influence_factors(x_test, y_test), direct.influence_factors(x_test, y_test))
        < 1e-10
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [None, 5])
def test_corrected_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_basis(bias, hidden):
    net = classifier(bias=bias, hidden=hidden)
    x, y = data(25)
    factors = fit_ekfac_factors(net, DataLoader(TensorDataset(x, y), batch_size=8), True)
    for name, f in factors.items():
        fisher = exact_fisher(net, x, f.parameter_names)
        fisher_v = to_v_layout(fisher, f.out_features, f.in_features, f.has_bias)
        Q = torch.kron(f.evecs_g[0], f.evecs_a[0])  # one group
        expected = torch.diagonal(Q.T @ fisher_v @ Q).reshape(f.diag.shape)
        assert rel_error(f.diag, expected) < 1e-10, name


def test_kfac_factors_are_the_kronecker_product_of_second_moments():
    """Without the correction, G ⊗ A with A = mean ããᵀ over layer inputs and
    G = mean Kᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Kᵢ, Kᵢ = ∂logits/∂(layer output), computed by hand."""
    net = classifier(hidden=5)
    x, y = data(20)
    factors = fit_ekfac_factors(net, DataLoader(TensorDataset(x, y), batch_size=6), False)
    ones = torch.ones(20, 1, dtype=DT)
    with torch.no_grad():
        h = torch.tanh(net[0](x))
        p = torch.softmax(net(x), dim=1)
    fisher_logits = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    K0 = net[2].weight.detach()[None] * (1 - h**2)[:, None, :]  # (N, C, hidden)
    expected = {
        "0": (torch.einsum("nci,ncd,ndj->ij", K0, fisher_logits, K0) / 20, torch.cat([x, ones], 1)),
        "2": (fisher_logits.mean(0), torch.cat([h, ones], 1)),
    }
    for name, (G, inputs) in expected.items():
        f = factors[name]
        A = inputs.T @ inputs / 20
        Q = torch.kron(f.evecs_g[0], f.evecs_a[0])  # one group
        assert rel_error(Q @ torch.diag(f.diag.reshape(-1)) @ Q.T, torch.kron(G, A)) < 1e-10, name


def test_ekfac_leaves_model_untouched():
    net = classifier(hidden=5)
    x, y = data(12)
    EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1).fit(
        DataLoader(TensorDataset(x, y), batch_size=5)
    )
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks for m in net.modules())


def test_ekfac_leaves_out_unsupported_layers_and_refuses_a_model_without_any():
    net = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    influence = EkfacInfluence(net)
    assert influence.modules == ["2"]
    assert influence.excluded_parameters == ["0.weight", "0.bias"]
    only_conv1d = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten())
    with pytest.raises(NotImplementedLayerRepresentationException, match=r"0 \(Conv1d\)"):
        EkfacInfluence(only_conv1d)
    partly = classifier()
    partly[0].bias.requires_grad_(False)  # a frozen bias: the layer is factored without it
    assert EkfacInfluence(partly).parameter_names == ["0.weight"]


def test_ekfac_needs_regularization_for_singular_factors():
    net = classifier()
    x, y = data(1)
    with pytest.raises(ValueError, match="hessian_regularization"):
        EkfacInfluence(net, hessian_regularization=0.0).fit(DataLoader(TensorDataset(x, y)))


def test_explore_hessian_regularization_matches_refits():
    net = classifier(hidden=5)
    x, y = data(15)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1).fit(loader)
    explored = model.explore_hessian_regularization(x[:3], y[:3], [0.1, 1.0])
    for lam in (0.1, 1.0):
        per_layer = model.with_regularization(lam).influences_by_layer(x[:3], y[:3])
        for layer, value in per_layer.items():
            assert rel_error(explored[lam][layer], value) < 1e-12
