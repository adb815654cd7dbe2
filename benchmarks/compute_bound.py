"""The compute bound of an influence method: the products it cannot avoid, timed with plain
torch / torch.func on the same model, data and device (no influence library involved).

What is replayed (``ProductLog`` is recorded from the engine in the same process):

* curvature products: every logged ``(batch size B, K vectors)`` Hessian product becomes
  ``vmap`` over K vectors of ``vjp(grad(loss_sum))`` on a batch of B training points,
  the graph of the gradient built once per product (reverse-over-reverse was the fastest
  plain torch.func HVP for these MLPs), vectors chunked so that B·K ≤ 2¹⁶ and
  on the CPU B·K·(activation elements per sample) ≤ 2²³ per ``vmap`` (larger vectorised
  double backwards leave the CPU caches: about 3x slower on the CNN cases);
* per-sample gradients: ``vmap(grad(per-sample loss))`` over the test points (factors) and
  over every training chunk (scoring), flattened to (N, P);
* dense linear algebra the method needs: Cholesky of the (P, P) matrix and the triangular
  solves (Direct), the thin QR of the search block each iteration (block CG), QR, Cholesky
  and SVD of the sketch (Nyström), the low-rank projections (Arnoldi, Nyström), the
  Sherman–Morrison pass over the data per application (inverse harmonic mean);
* EK-FAC: per batch one forward pass of the MLP and the C per-class output gradients
  back-propagated by hand as matrix products, the covariance products, ``eigh`` of every
  factor, the second pass for ``update_diagonal``, and the Kronecker-eigenbasis transforms
  of the test gradients;
* scoring: per-sample gradients of the training points and one matrix product per chunk.

Not counted: vector updates of the iterative solvers (O(K·P) per iteration), Krylov
orthogonalisation in Arnoldi, Python overhead, data loading. The bound is a single timed
replay, so it carries the same noise as the engine's single timed run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp, vmap

#: Sample-vectors per vmapped curvature product (memory bound of one product).
BUDGET = 1 << 16
#: Activation elements (samples x vectors x per-sample activations) per vmapped product.
ACTIVATION_BUDGET = 1 << 23


@dataclass
class ProductLog:
    """Products recorded from the engine: ``products`` are per-batch curvature products
    ``{phase, kind, batch, vectors}``; ``applications`` are whole operator applications
    ``{phase, kind, vectors}`` (one per CG iteration, one per IHM application, ...)."""

    products: list[dict[str, Any]] = field(default_factory=list)
    applications: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "setup"


class PlainTorchFunc:
    """Plain torch.func products of a classifier trained with cross-entropy."""

    def __init__(
        self,
        model: torch.nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.device = device
        self.params = {k: v.detach() for k, v in model.named_parameters()}
        self.shapes = {k: v.shape for k, v in self.params.items()}
        self.sizes = [v.numel() for v in self.params.values()]
        self.n_parameters = sum(self.sizes)
        self.x_train = x_train.to(device)
        self.y_train = y_train.to(device)
        self.batch_size = batch_size
        self._random = torch.zeros(0, self.n_parameters, device=device)

    # ------------------------------------------------------------------ helpers
    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def vectors(self, k: int) -> torch.Tensor:
        """k random (P,) rows (cached; the values do not change the cost)."""
        if self._random.shape[0] < k:
            self._random = torch.randn(k, self.n_parameters, device=self.device)
        return self._random[:k]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {
            name: piece.reshape(*flat.shape[:-1], *shape)
            for (name, shape), piece in zip(self.shapes.items(), pieces, strict=True)
        }

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in self.shapes], 1)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, self.x_train.shape[0], self.batch_size):
            yield self.x_train[lo : lo + self.batch_size], self.y_train[lo : lo + self.batch_size]

    # ------------------------------------------------------------------ products
    def per_sample_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, P) per-sample gradients by vmap(grad)."""
        model = self.model

        def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> Any:
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(self.params, x, y)
        return self.flatten(g)

    def activations(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Elements saved for backward by one sample's loss, parameters excluded."""
        if getattr(self, "_activations", None) is None:
            count = [0]
            weights = {p.untyped_storage().data_ptr() for p in self.params.values()}
            leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.untyped_storage().data_ptr() not in weights:
                    count[0] += t.numel()
                return t

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                F.cross_entropy(functional_call(self.model, leaves, (x[:1],)), y[:1])
            self._activations = max(1, count[0])
        return int(self._activations)

    def hvp(self, x: torch.Tensor, y: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """(K, P): rows Σ_batch ∇²ℓ v_k, reverse-over-reverse, chunked over vectors."""
        model = self.model

        def loss_sum(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, p, (x,)), y, reduction="sum")

        vjp_fn = vjp(grad(loss_sum), self.params)[1]  # built once, applied to K vectors
        per_sample = self.activations(x, y) if x.device.type == "cpu" else 1  # as the engine
        by_activations = ACTIVATION_BUDGET // max(1, x.shape[0] * per_sample)
        chunk = max(1, min(mat.shape[0], BUDGET // max(1, x.shape[0]), by_activations))
        outs = [self.flatten(vmap(vjp_fn)(self.split(m))[0]) for m in torch.split(mat, chunk)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _replay_products(plain: PlainTorchFunc, entries: list[dict[str, Any]]) -> None:
    for e in entries:
        if e["kind"] != "hvp":
            raise ValueError(f"The bound replays Hessian products only, got {e['kind']!r}.")
        b = int(e["batch"])
        plain.hvp(plain.x_train[:b], plain.y_train[:b], plain.vectors(int(e["vectors"])))


def _ihm_application(plain: PlainTorchFunc, mat: torch.Tensor, lam: float) -> torch.Tensor:
    total = torch.zeros_like(mat)
    for x, y in plain.batches():
        g = plain.per_sample_grads(x, y)
        weights = 1.0 / (lam + (g * g).sum(dim=1))
        total += ((mat @ g.T) * weights) @ g
    return (mat - total / plain.x_train.shape[0]) / lam


# ---------------------------------------------------------------------- EK-FAC
def _linear_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not all(isinstance(m, torch.nn.Linear | torch.nn.Tanh) for m in model.children()):
        raise ValueError("The EK-FAC bound handles Sequential MLPs of Linear and Tanh layers.")
    return layers


def _fisher_taps(
    layers: list[torch.nn.Linear], x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: inputs with a ones column (N, in+1) and per-class output gradients
    s_c = √p_c ∂(−log p_c)/∂(layer output), shape (C, N, out), by hand-written backprop."""
    inputs, pre = [], []
    h = x
    with torch.no_grad():
        for i, layer in enumerate(layers):
            inputs.append(torch.cat([h, torch.ones(h.shape[0], 1, device=h.device)], 1))
            z = h @ layer.weight.T + layer.bias
            pre.append(z)
            h = torch.tanh(z) if i < len(layers) - 1 else z
        p = torch.softmax(h, dim=1)
        eye = torch.eye(p.shape[1], device=p.device)
        g = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None])  # (C, N, C)
        grads = [g]
        for i in range(len(layers) - 1, 0, -1):
            g = (g @ layers[i].weight) * (1 - torch.tanh(pre[i - 1]) ** 2)
            grads.append(g)
    return inputs, grads[::-1]


def ekfac_fit(
    plain: PlainTorchFunc, update_diagonal: bool
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (Q_A, Q_G, eigenvalues (out, in+1)) of the Fisher's Kronecker factors."""
    layers = _linear_layers(plain.model)
    a_acc = [torch.zeros(m.in_features + 1, m.in_features + 1, device=plain.device) for m in layers]
    g_acc = [torch.zeros(m.out_features, m.out_features, device=plain.device) for m in layers]
    for x, _ in plain.batches():
        inputs, grads = _fisher_taps(layers, x)
        for i in range(len(layers)):
            a_acc[i] += inputs[i].T @ inputs[i]
            s = grads[i].reshape(-1, grads[i].shape[-1])
            g_acc[i] += s.T @ s
    n = plain.x_train.shape[0]
    factors = []
    for a, g in zip(a_acc, g_acc, strict=True):
        ea, qa = torch.linalg.eigh(a / n)
        eg, qg = torch.linalg.eigh(g / n)
        factors.append((qa, qg, torch.outer(eg, ea)))
    if update_diagonal:
        diag = [torch.zeros_like(f[2]) for f in factors]
        for x, _ in plain.batches():
            inputs, grads = _fisher_taps(layers, x)
            for i, (qa, qg, _) in enumerate(factors):
                diag[i] += torch.einsum("cno,nj->oj", (grads[i] @ qg) ** 2, (inputs[i] @ qa) ** 2)
        factors = [(qa, qg, d / n) for (qa, qg, _), d in zip(factors, diag, strict=True)]
    return factors


def ekfac_apply(
    plain: PlainTorchFunc,
    factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    grads: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """The damped inverse applied to flat gradients [W₁, b₁, W₂, b₂, ...] (K, P)."""
    layers = _linear_layers(plain.model)
    out, start = [], 0
    for layer, (qa, qg, diag) in zip(layers, factors, strict=True):
        o, i = layer.out_features, layer.in_features
        w = grads[:, start : start + o * i].reshape(-1, o, i)
        b = grads[:, start + o * i : start + o * i + o].reshape(-1, o, 1)
        v = qg.T @ torch.cat([w, b], dim=2) @ qa / (diag + lam)
        v = qg @ v @ qa.T
        out += [v[:, :, :i].reshape(v.shape[0], -1), v[:, :, i]]
        start += o * (i + 1)
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------- per method
def method_bound(
    plain: PlainTorchFunc,
    cls: str,
    kwargs: dict[str, Any],
    log: ProductLog,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> dict[str, float]:
    """Seconds of the unavoidable work of ``fit``, ``factors`` and ``score``."""
    sync = plain.synchronize
    P = plain.n_parameters
    lam = float(kwargs.get("regularization") or kwargs.get("hessian_regularization") or 0.0)
    by_phase = {
        ph: [e for e in log.products if e["phase"] == ph] for ph in ("fit", "factors", "score")
    }
    state: dict[str, Any] = {}

    def fit() -> None:
        _replay_products(plain, by_phase["fit"])
        if cls == "DirectInfluence":
            state["chol"] = torch.linalg.cholesky(torch.eye(P, device=plain.device) * (1 + lam))
        elif cls == "NystroemSketchInfluence":
            r = min(int(kwargs["rank"]), P)
            omega, _ = torch.linalg.qr(plain.vectors(r).T.contiguous())
            sketch = plain.vectors(r).T + omega  # stands for A·Ω (computed by the replay)
            core = omega.T @ sketch  # (r, r); made symmetric positive definite below
            chol = torch.linalg.cholesky(core.T @ core + torch.eye(r, device=omega.device))
            factor = torch.linalg.solve_triangular(chol.T, sketch, upper=True, left=False)
            state["basis"] = torch.linalg.svd(factor, full_matrices=False)[0]
        elif cls == "ArnoldiInfluence":
            state["basis"] = torch.linalg.qr(plain.vectors(int(kwargs.get("rank", 10))).T)[0]
        elif cls == "EkfacInfluence":
            state["ekfac"] = ekfac_fit(plain, bool(kwargs.get("update_diagonal", False)))

    def factors() -> None:
        g = plain.per_sample_grads(x_test, y_test)
        _replay_products(plain, by_phase["factors"])
        for app in log.applications:
            if app["phase"] != "factors":
                continue
            if app["kind"] == "ihm":
                _ihm_application(plain, plain.vectors(int(app["vectors"])), lam)
            elif cls == "CgInfluence" and kwargs.get("solve_simultaneously"):
                torch.linalg.qr(plain.vectors(int(app["vectors"])).T)
        if cls == "DirectInfluence":
            state["factors"] = torch.cholesky_solve(g.T, state["chol"]).T
        elif "basis" in state:
            v = state["basis"]
            projected = (g @ v) @ v.T
            woodbury = cls == "NystroemSketchInfluence" or kwargs.get("use_woodbury", False)
            state["factors"] = projected + (g - projected) / lam if woodbury else projected
        elif cls == "EkfacInfluence":
            state["factors"] = ekfac_apply(plain, state["ekfac"], g, lam)
        else:
            state["factors"] = g

    def score() -> None:
        f = state["factors"]
        for x, y in plain.batches():
            _ = f @ plain.per_sample_grads(x, y).T

    return {
        "fit": timed(fit, sync),
        "factors": timed(factors, sync),
        "score": timed(score, sync),
    }


def hvp_check(plain: PlainTorchFunc, engine_hvp: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Relative difference between the plain HVP (mean over the data) and the engine's
    curvature product on two random vectors: shows the bound computes the same thing."""
    mat = torch.randn(2, plain.n_parameters, device=plain.device)
    total = torch.zeros_like(mat)
    for x, y in plain.batches():
        total += plain.hvp(x, y, mat)
    plain_result = total / plain.x_train.shape[0]
    engine_result = engine_hvp(mat)
    return float(torch.linalg.norm(plain_result - engine_result) / torch.linalg.norm(plain_result))
