"""EK-FAC on a causal transformer and a CNN: the per-layer path against brute force.

Every score of the engine's per-layer path (hooks, one forward and backward per batch) must
equal the brute force: per-example layer gradients from one autograd call per example and
the fitted EK-FAC inverse applied as a dense matrix (float64, relative error < 1e-6), for the
three Fisher choices. The exact Fisher's eigenvalue correction must equal the diagonal of
(1/N) Σᵢ Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t in the Kronecker eigenbasis (J_t the Jacobian of
position t's logits).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from influence_pipeline.influence import EkfacInfluence, fit_ekfac_factors

from .ekfac_brute import (
    TinyGPT,
    dense_inverse,
    dense_scores,
    layer_matrix,
    per_example_matrices,
    rel,
    sequence_loss,
)

DT = torch.float64
LAM = 0.05


def gpt_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyGPT().to(DT).eval()


def gpt_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 7, (n, 6), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :5], tokens[:, 1:]


def cnn_model(bias: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return (
        torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=bias),
            torch.nn.Tanh(),
            torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=bias),
            torch.nn.Tanh(),
            torch.nn.Conv2d(4, 2, 2, padding="same", padding_mode="reflect", bias=bias),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 3),
        )
        .to(DT)
        .eval()
    )


def cnn_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 7, 7, generator=gen, dtype=DT), torch.randint(
        0, 3, (n,), generator=gen
    )


CASES = {
    "gpt": (gpt_model, gpt_data, sequence_loss),
    "cnn": (cnn_model, cnn_data, F.cross_entropy),
    "cnn_nobias": (lambda: cnn_model(bias=False), cnn_data, F.cross_entropy),
}


def fitted(case: str, fisher: str):
    make_model, make_data, loss = CASES[case]
    model = make_model()
    x, y = make_data(10, seed=1)
    influence = EkfacInfluence(
        model,
        update_diagonal=True,
        hessian_regularization=LAM,
        fisher=fisher,
        fisher_samples=3,
        seed=0,
        batch_size=4,
    ).fit(DataLoader(TensorDataset(x, y), batch_size=4))
    return influence, model, loss, (x, y), make_data(3, seed=2)


def brute_inverses(influence):
    return {
        name: dense_inverse(
            comp.op.factors.evecs_g, comp.op.factors.evecs_a, comp.op.factors.diag, LAM
        )
        for name, comp in influence.block_mapper.items()
    }


@pytest.mark.parametrize("fisher", ["exact", "sampled", "empirical"])
@pytest.mark.parametrize("case", ["gpt", "cnn", "cnn_nobias"])
def test_per_layer_scores_equal_brute_force(case, fisher):
    influence, model, loss, (x, y), (x_test, y_test) = fitted(case, fisher)
    names = influence.modules
    inverses = brute_inverses(influence)
    train = per_example_matrices(model, loss, x, y, names)
    test = per_example_matrices(model, loss, x_test, y_test, names)
    expected = dense_scores(test, train, inverses)

    assert rel(influence.influences(x_test, y_test, x, y), expected) < 1e-6
    by_layer = influence.influences_by_layer(x_test, y_test, x, y)
    for name in names:
        one = dense_scores(test, train, {name: inverses[name]})
        assert rel(by_layer[name], one) < 1e-6, name
    self_expected = torch.diagonal(dense_scores(train, train, inverses))
    assert rel(influence.self_influences(x, y), self_expected) < 1e-6

    # flat (N, P) factors in pyDVL's layout: contract with flat per-example gradients
    factors = influence.influence_factors(x_test, y_test)
    params = dict(model.named_parameters())
    flat_train = []
    with sdpa_kernel(SDPBackend.MATH):
        for xi, yi in zip(x, y, strict=True):
            out = model(xi[None])
            grads = torch.autograd.grad(
                loss(out, yi[None]), [params[n] for n in influence.parameter_names]
            )
            flat_train.append(torch.cat([g.reshape(-1) for g in grads]))
    assert rel(factors @ torch.stack(flat_train).T, expected) < 1e-6
    assert rel(influence.influences_from_factors(factors, x, y), expected) < 1e-6


def exact_fisher_diagonal(model, x, factors):
    """Mean over examples of Σ_t Σ_{c,c'} M_t[c,c'] (Q_Gᵀ J_tc Q_A) ⊙ (Q_Gᵀ J_tc' Q_A)."""
    modules = dict(model.named_modules())
    total = {name: 0 for name in factors}
    with sdpa_kernel(SDPBackend.MATH):
        for xi in x:
            logits = model(xi[None]).reshape(-1, model(xi[None]).shape[-1])  # (T, C)
            p = torch.softmax(logits, dim=-1).detach()
            for name, f in factors.items():
                m = modules[name]
                params = [m.weight] + ([m.bias] if m.bias is not None else [])
                rows = []
                for t in range(logits.shape[0]):
                    for c in range(logits.shape[1]):
                        grads = torch.autograd.grad(logits[t, c], params, retain_graph=True)
                        v = layer_matrix(m, grads[0], grads[1] if len(grads) > 1 else None)
                        rows.append(f.evecs_g.transpose(-1, -2) @ v @ f.evecs_a)
                jq = torch.stack(rows).reshape(logits.shape[0], logits.shape[1], *f.diag.shape)
                fisher_logits = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
                total[name] = total[name] + torch.einsum(
                    "tc...,tcd,td...->...", jq, fisher_logits, jq
                )
    return {name: t / len(x) for name, t in total.items()}


@pytest.mark.parametrize("case", ["gpt", "cnn"])
def test_exact_fisher_correction_is_the_fisher_diagonal(case):
    make_model, make_data, _ = CASES[case]
    model = make_model()
    x, y = make_data(4, seed=3)
    factors = fit_ekfac_factors(
        model, DataLoader(TensorDataset(x, y), batch_size=3), True, fisher="exact"
    )
    expected = exact_fisher_diagonal(model, x, factors)
    for name, f in factors.items():
        assert rel(f.diag, expected[name]) < 1e-8, name


def test_sampled_fisher_approaches_the_exact_one():
    model = gpt_model()
    x, y = gpt_data(6, seed=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)

    def curvature(factors):
        return {
            n: f.evecs_g[0].kron(f.evecs_a[0])
            @ torch.diag(f.diag.reshape(-1))
            @ f.evecs_g[0].kron(f.evecs_a[0]).T
            for n, f in factors.items()
        }

    exact = curvature(fit_ekfac_factors(model, loader, True, fisher="exact"))
    errors = []
    for k in (4, 64, 1024):
        sampled = curvature(
            fit_ekfac_factors(model, loader, True, fisher="sampled", fisher_samples=k, seed=0)
        )
        errors.append(max(rel(sampled[n], exact[n]) for n in exact))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.1
    first = fit_ekfac_factors(model, loader, True, fisher="sampled", fisher_samples=4, seed=0)
    second = fit_ekfac_factors(model, loader, True, fisher="sampled", fisher_samples=4, seed=0)
    other = fit_ekfac_factors(model, loader, True, fisher="sampled", fisher_samples=4, seed=1)
    assert all(torch.equal(first[n].diag, second[n].diag) for n in first)  # seeded
    assert not all(torch.equal(first[n].diag, other[n].diag) for n in first)
