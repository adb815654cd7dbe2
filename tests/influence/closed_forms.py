"""Small exact problems with closed-form derivatives (float64).

Both models are linear in their parameters: two Linear layers ``a`` and ``b`` (without a
bias, so the Hessian is regular) read the two halves of the input and their outputs are
summed, f(x) = W_a x_a + b_a + W_b x_b. So f(x) = J(x) θ with an explicit Jacobian J(x)
(k × P) whose columns follow ``named_parameters()``: a.weight (row-major), a.bias, b.weight.
With two children the model has two layers (LAYER_WISE) and three parameters
(PARAMETER_WISE).

* Linear regression, ℓ = mean_k (f(x) − y)²: ∇_θℓ = (2/k) Jᵀr with r = f(x) − y, the Hessian
  of the mean loss is (2/(kN)) Σᵢ JᵢᵀJᵢ, the mixed derivative ∂/∂x_c of ∇_θℓ is
  (2/k)(∂Jᵀ/∂x_c r + Jᵀ W_{:,c}).
* Logistic regression (k = 1, binary cross-entropy with logits), ℓ = softplus(z) − y z:
  ∇_θℓ = (σ(z) − y) J, the Hessian is (1/N) Σᵢ σ'(zᵢ) JᵢᵀJᵢ with σ' = σ(1 − σ), and the
  mixed derivative ∂/∂x_c of ∇_θℓ is σ'(z) w_c J + (σ(z) − y) ∂J/∂x_c. An L2 penalty
  (α/2)‖θ‖² adds αI to the Hessian: it is the methods' regularization.
The Gauss-Newton matrix of the conventions is (1/N) Σᵢ gᵢgᵢᵀ for either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPE = torch.float64


class TwoLinear(torch.nn.Module):
    def __init__(self, d_a: int, d_b: int, k: int) -> None:
        super().__init__()
        self.d_a = d_a
        self.a = torch.nn.Linear(d_a, k)
        self.b = torch.nn.Linear(d_b, k, bias=False)  # one bias only: the Hessian stays regular

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, : self.d_a]) + self.b(x[:, self.d_a :])


@dataclass
class Problem:
    model: TwoLinear
    loss: object
    x: torch.Tensor
    y: torch.Tensor
    kind: str

    @property
    def k(self) -> int:
        return self.model.a.out_features

    @property
    def d(self) -> int:
        return self.x.shape[1]

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weight_matrix(self) -> torch.Tensor:
        """W (k, d): the derivative of f(x) w.r.t. x."""
        return torch.cat([self.model.a.weight, self.model.b.weight], dim=1).detach()

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """J(x) of f(x) = J(x) θ, shape (N, k, P)."""
        n, k, d_a = x.shape[0], self.k, self.model.d_a
        eye = torch.eye(k, dtype=DTYPE)
        parts = []
        parts.append(torch.einsum("ac,nb->nacb", eye, x[:, :d_a]).reshape(n, k, -1))  # a.weight
        parts.append(eye.expand(n, k, k))  # a.bias
        parts.append(torch.einsum("ac,nb->nacb", eye, x[:, d_a:]).reshape(n, k, -1))  # b.weight
        return torch.cat(parts, dim=2)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        return self.jacobian(x) @ theta

    # ---------------------------------------------------------------- closed forms
    def grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        J = self.jacobian(x)
        if self.kind == "linear":
            r = self.outputs(x) - y
            return (2.0 / self.k) * torch.einsum("nkp,nk->np", J, r)
        z = self.outputs(x)[:, 0]
        return (torch.sigmoid(z) - y[:, 0])[:, None] * J[:, 0, :]

    def hessian(self) -> torch.Tensor:
        J = self.jacobian(self.x)
        n = self.x.shape[0]
        if self.kind == "linear":
            return (2.0 / (self.k * n)) * torch.einsum("nkp,nkq->pq", J, J)
        s = torch.sigmoid(self.outputs(self.x)[:, 0])
        return torch.einsum("n,np,nq->pq", s * (1 - s), J[:, 0], J[:, 0]) / n

    def gauss_newton(self) -> torch.Tensor:
        g = self.grads(self.x, self.y)
        return g.T @ g / self.x.shape[0]

    def mixed_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇_x∇_θℓ per sample: (N, d, P)."""
        J = self.jacobian(x)
        W = self.weight_matrix()  # (k, d)
        # ∂J/∂x_c: the weight columns of J are linear in x, the bias columns constant.
        dJ = self.jacobian(torch.eye(self.d, dtype=DTYPE)) - self.jacobian(
            torch.zeros(self.d, self.d, dtype=DTYPE)
        )
        if self.kind == "linear":
            r = self.outputs(x) - y  # (N, k)
            term1 = torch.einsum("ckp,nk->ncp", dJ, r)
            term2 = torch.einsum("nkp,kc->ncp", J, W)
            return (2.0 / self.k) * (term1 + term2)
        z = self.outputs(x)[:, 0]
        s = torch.sigmoid(z)
        term1 = torch.einsum("n,c,np->ncp", s * (1 - s), W[0], J[:, 0])
        term2 = torch.einsum("n,cp->ncp", s - y[:, 0], dJ[:, 0])
        return term1 + term2


def make_problem(
    kind: str, n: int = 40, d_a: int = 3, d_b: int = 2, k: int = 2, seed: int = 0
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    if kind == "logistic":
        k = 1
    model = TwoLinear(d_a, d_b, k).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) * 0.5)
    x = torch.randn(n, d_a + d_b, generator=gen, dtype=DTYPE)
    if kind == "linear":
        y = torch.randn(n, k, generator=gen, dtype=DTYPE)
        return Problem(model, F.mse_loss, x, y, kind)
    if kind == "logistic":
        y = torch.randint(0, 2, (n, 1), generator=gen).to(DTYPE)
        return Problem(model, F.binary_cross_entropy_with_logits, x, y, kind)
    raise ValueError(kind)


def block_indices(problem: Problem, blocks: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Flat parameter indices of each block (parameters in named_parameters order)."""
    offsets, start = {}, 0
    for name, p in problem.model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    return {b: torch.cat([offsets[n] for n in names]) for b, names in blocks.items()}


def block_diagonal_factors(
    matrix: torch.Tensor,
    grads: torch.Tensor,
    blocks: dict[str, torch.Tensor],
    regularization: dict[str, float | None],
) -> torch.Tensor:
    """Factors A_B⁻¹ g_B concatenated over blocks, by explicit dense solves."""
    parts = []
    for block, idx in blocks.items():
        A = matrix[idx][:, idx].clone()
        lam = regularization.get(block)
        if lam:
            A += lam * torch.eye(len(idx), dtype=DTYPE)
        parts.append(torch.linalg.solve(A, grads[:, idx].T).T)
    return torch.cat(parts, dim=1)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))
