"""Curvature methods on attention models: the engine picks a backend with second derivatives.

``torch.nn.TransformerEncoderLayer`` calls ``scaled_dot_product_attention``, whose fused CPU
kernel has no double backward; Hessian products must work anyway, without the caller
choosing a backend. Direct (dense Hessian) and CG (streamed Hessian products) must agree,
and the first-order quantities must match plain autograd on the model as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from influence_pipeline.influence import (
    CgInfluence,
    DirectInfluence,
    InfluenceMode,
    TorchBatch,
    TorchGradientProvider,
)

from .closed_forms import rel_error


class TinyEncoder(torch.nn.Module):
    """Embed 3 features per position, one encoder layer (2 heads), mean-pool, classify."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.encoder = torch.nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=8, dropout=0.0, batch_first=True
        )
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def _problem() -> tuple[TinyEncoder, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyEncoder().double().eval()
    x = torch.randn(10, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    return model, x, y


def test_direct_and_cg_agree_on_a_transformer_encoder_layer():
    model, x, y = _problem()
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    # The Hessian of this untrained model has eigenvalues in about [-2.9, 3.6]; λ = 5 makes
    # A + λI positive definite (condition number about 4), so CG converges.
    direct = DirectInfluence(model, F.cross_entropy, regularization=5.0).fit(loader)
    cg = CgInfluence(
        model, F.cross_entropy, regularization=5.0, rtol=1e-12, atol=1e-14, maxiter=2000
    ).fit(loader)
    f_direct = direct.influence_factors(x[:3], y[:3])
    f_cg = cg.influence_factors(x[:3], y[:3])
    assert f_direct.shape == (3, direct.n_parameters)
    assert torch.isfinite(f_direct).all()
    assert rel_error(f_cg, f_direct) < 1e-7
    # Perturbation mode needs ∇_x∇_θ through attention as well.
    pert = direct.influences(x[:2], y[:2], x[6:8], y[6:8], mode=InfluenceMode.Perturbation)
    assert pert.shape == (2, 2, 4, 3)
    assert torch.isfinite(pert).all()


def test_gradients_through_attention_match_autograd():
    model, x, y = _problem()
    provider = TorchGradientProvider(model, F.cross_entropy)
    grads = provider.flat_grads(TorchBatch(x[:3], y[:3]))
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert rel_error(grads[i], expected) < 1e-12
    # The backend is chosen only inside the engine's calls: the caller's choice is restored.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        provider.hessian_prod_sum(TorchBatch(x[:2], y[:2]), grads[:1])
        q = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        out = F.scaled_dot_product_attention(q, q, q)
        grad_q = torch.autograd.grad(out.sum(), q, create_graph=True)[0]
        raised = False
        try:  # the caller's flash kernel is still selected: no second derivative
            torch.autograd.grad(grad_q.sum(), q)
        except RuntimeError:
            raised = True
        assert raised
