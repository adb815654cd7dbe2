"""Per-sample derivatives of a torch model's loss with torch.func.

For a block of parameters θ_B (all other parameters and buffers held fixed) and the
per-sample loss ℓ(θ; xᵢ, yᵢ) = loss(model(xᵢ[None]), yᵢ[None]):

* ``grads``: ∇_θB ℓ(zᵢ) for every sample, ``vmap`` over ``grad`` — no loop over samples;
* ``mixed_grads``: ∇_x∇_θB ℓ(zᵢ), (N, *x.shape[1:], d) per parameter;
* ``jacobian_prod(batch, g)``: ⟨∇_θB ℓ(zᵢ), g_k⟩ for g of shape (K, P), by forward-mode
  products (K jvps over the batch), never materialising per-sample gradients;
* ``mixed_jacobian_prod(batch, g)``: ∇_x ⟨∇_θB ℓ(zᵢ), g_k⟩, (N, K, *x.shape[1:]); the
  perturbation influence of K factors without the (N, n, P) mixed-gradient tensor;
* ``hessian_prod_sum`` / ``gauss_newton_prod_sum``: Σᵢ ∇²ℓ(zᵢ) v_k and Σᵢ gᵢ gᵢᵀ v_k for
  K vectors at once (reverse-over-reverse: one gradient graph per batch, its vjp
  vectorised over the K vectors).

Flat layouts concatenate the block's parameters, each flattened row-major, in block order.
Inputs are moved to the model's device and floating inputs cast to its dtype.

Attention: every product here runs under ``torch.func`` transforms (vmap, second
derivatives, forward mode). The fused ``scaled_dot_product_attention`` kernels (flash,
memory-efficient) have no double-backward formula and no vmap batching rule (a slow
per-sample fallback), so each call selects the math backend, which is plain differentiable
torch operations, and turns off the fused inference path of ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` in eval mode (no forward-mode derivative); the result is the
same attention, the caller's settings are restored afterwards, and models without
attention are unaffected.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import torch
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .batch import TorchBatch
from .finite import all_finite
from .types import GradientProvider

LossType = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Upper bound on (samples x vectors) handled in one vectorised curvature product; larger
#: products are split into chunks of vectors so memory stays bounded.
MAX_SAMPLE_VECTORS = 1 << 16

#: Upper bound on (samples x vectors x activation elements per sample) in one vectorised
#: Hessian product. The vectorised double backward holds every activation once per
#: (sample, vector); past a few MB these tensors leave the CPU caches and the elementwise
#: steps (ReLU masks, additions, copies) become memory-bound: measured on small CNNs
#: (10-20 thousand parameters, batch 100, 100 vectors), chunks of ~20 vectors ran about
#: 3x faster than all 100 at once, with no loss for MLPs (whose activations are small).
#: Applied on the CPU only (not measured on GPUs, which keep the sample-vector bound).
MAX_ACTIVATION_ELEMENTS = 1 << 23

_P = ParamSpec("_P")
_R = TypeVar("_R")


def differentiable_attention(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with ``scaled_dot_product_attention`` on its math backend (the only
    one with second derivatives and vmap batching rules) and without the fused
    MultiheadAttention inference path (see the module docstring)."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return function(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    return wrapper


def resolve_parameter_names(
    model: torch.nn.Module, restrict_to: Mapping[str, Any] | Sequence[str] | None
) -> list[str]:
    """Names of the parameters a block differentiates, validated against the model."""
    available = [name for name, _ in model.named_parameters()]
    if restrict_to is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        names = list(restrict_to.keys() if isinstance(restrict_to, Mapping) else restrict_to)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"Unknown parameter names {unknown}; the model has parameters {available}."
            )
    if not names:
        raise ValueError("No trainable parameters to differentiate: the block is empty.")
    if len(set(names)) != len(names):
        raise ValueError(f"Parameter names are repeated in {names}.")
    return names


def _cast_like_model(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


class TorchGradientProvider(GradientProvider[TorchBatch, torch.Tensor]):
    """Per-sample gradients of ``loss(model(x), y)`` w.r.t. a block of parameters.

    Args:
        model: the model; its current parameters and buffers are read at every call.
        loss: a loss ``loss(output, target) -> scalar``; it sees one sample at a time,
            ``loss(model(xᵢ[None]), yᵢ[None])``, so its reduction does not matter.
        restrict_to: parameter names (or a name → parameter mapping) of the block;
            ``None`` means every trainable parameter.

    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> gp = TorchGradientProvider(model, torch.nn.functional.mse_loss)
    >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    >>> expected = 2 * (model(x) - y) * x   # ∇_w (w·x - y)² per sample
    >>> torch.allclose(gp.flat_grads(TorchBatch(x, y)), expected.detach())
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        restrict_to: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.loss = loss
        self.param_names: list[str] = resolve_parameter_names(model, restrict_to)
        params = dict(model.named_parameters())
        self.param_shapes: OrderedDict[str, torch.Size] = OrderedDict(
            (n, params[n].shape) for n in self.param_names
        )
        self.param_sizes: list[int] = [int(s.numel()) for s in self.param_shapes.values()]

    # ------------------------------------------------------------------ structure
    @property
    def n_parameters(self) -> int:
        return sum(self.param_sizes)

    @property
    def input_dict_structure(self) -> dict[str, tuple[int, ...]]:
        """Shape of each parameter's flat per-sample gradient, without the batch axis."""
        return {n: (s,) for n, s in zip(self.param_names, self.param_sizes, strict=True)}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> TorchGradientProvider:
        self.model = self.model.to(device)
        return self

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(K, P) → {name: (K, *param.shape)} (a plain dict: torch.func matches pytrees)."""
        pieces = torch.split(flat, self.param_sizes, dim=-1)
        lead = flat.shape[:-1]
        return {
            n: piece.reshape(*lead, *shape)
            for (n, shape), piece in zip(self.param_shapes.items(), pieces, strict=True)
        }

    def flatten(self, tensors: Mapping[str, torch.Tensor], lead_dims: int = 1) -> torch.Tensor:
        """{name: (*lead, *param.shape)} → (*lead, P) in block order."""
        parts = [tensors[n].reshape(*tensors[n].shape[:lead_dims], -1) for n in self.param_names]
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------ functional core
    def _params(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(block parameters, everything else) as detached tensors of the live model."""
        block: dict[str, torch.Tensor] = {}
        fixed: dict[str, torch.Tensor] = {}
        wanted = set(self.param_names)
        for name, p in self.model.named_parameters():
            (block if name in wanted else fixed)[name] = p.detach()
        for name, b in self.model.named_buffers():
            fixed[name] = b
        return {n: block[n] for n in self.param_names}, fixed

    def _prepare(self, batch: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = self.device, self.dtype
        return _cast_like_model(batch.x, device, dtype), _cast_like_model(batch.y, device, dtype)

    def _sample_loss_fn(
        self, fixed: dict[str, torch.Tensor]
    ) -> Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]:
        model, loss = self.model, self.loss

        def sample_loss(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            out = functional_call(model, {**fixed, **params}, (x.unsqueeze(0),))
            value = loss(out, y.unsqueeze(0))
            if value.numel() != 1:
                raise ValueError(
                    "The loss must return one number per sample; "
                    f"loss(model(x[None]), y[None]) has shape {tuple(value.shape)}."
                )
            return value.reshape(())

        return sample_loss

    @staticmethod
    def _check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
        if not all_finite(tensor):
            bad = (~torch.isfinite(tensor.reshape(tensor.shape[0], -1))).any(dim=1)
            rows = torch.nonzero(bad).flatten()[:10].tolist()
            raise ValueError(
                f"Non-finite {what} for samples at batch positions {rows}: check the model, "
                "the loss and the data for NaN/inf."
            )
        return tensor

    # ------------------------------------------------------------------ gradients
    @differentiable_attention
    def per_sample_losses(self, batch: TorchBatch) -> torch.Tensor:
        """ℓ(zᵢ) for every sample: shape (N,)."""
        params, fixed = self._params()
        x, y = self._prepare(batch)
        with torch.no_grad():
            return vmap(self._sample_loss_fn(fixed), in_dims=(None, 0, 0))(params, x, y)

    def grads(self, batch: TorchBatch) -> OrderedDict[str, torch.Tensor]:
        """{name: (N, d_name)} per-sample gradients, each parameter flattened row-major."""
        flat = self.flat_grads(batch)
        return OrderedDict(
            (n, t)
            for n, t in zip(
                self.param_names, torch.split(flat, self.param_sizes, dim=1), strict=True
            )
        )

    @differentiable_attention
    def flat_grads(self, batch: TorchBatch) -> torch.Tensor:
        """(N, P) per-sample gradients."""
        params, fixed = self._params()
        x, y = self._prepare(batch)
        per_sample = vmap(grad(self._sample_loss_fn(fixed)), in_dims=(None, 0, 0))(params, x, y)
        return self._check_finite(self.flatten(per_sample), "gradients")

    @differentiable_attention
    def mixed_grads(self, batch: TorchBatch) -> OrderedDict[str, torch.Tensor]:
        """{name: (N, *x.shape[1:], d_name)} per-sample mixed derivatives ∇_x∇_θ ℓ."""
        params, fixed = self._params()
        x, y = self._prepare(batch)
        grad_x = grad(self._sample_loss_fn(fixed), argnums=1)
        mixed = vmap(jacrev(grad_x, argnums=0), in_dims=(None, 0, 0))(params, x, y)
        lead = x.dim()  # N and the input dimensions
        out = OrderedDict(
            (n, mixed[n].reshape(*mixed[n].shape[:lead], -1)) for n in self.param_names
        )
        for t in out.values():
            self._check_finite(t, "mixed gradients")
        return out

    def flat_mixed_grads(self, batch: TorchBatch) -> torch.Tensor:
        """(N, *x.shape[1:], P) per-sample mixed derivatives."""
        return torch.cat(list(self.mixed_grads(batch).values()), dim=-1)

    def _check_factor_matrix(self, g: torch.Tensor) -> torch.Tensor:
        if g.ndim == 1:
            g = g.unsqueeze(0)
        if g.ndim != 2 or g.shape[1] != self.n_parameters:
            raise ValueError(
                f"Expected a (K, {self.n_parameters}) matrix for this block, got shape "
                f"{tuple(g.shape)}."
            )
        return g.to(device=self.device, dtype=self.dtype)

    @differentiable_attention
    def jacobian_prod(self, batch: TorchBatch, g: torch.Tensor) -> torch.Tensor:
        """(N, K) matrix of ⟨∇_θℓ(zᵢ), g_k⟩ by K forward-mode products over the batch."""
        g = self._check_factor_matrix(g)
        params, fixed = self._params()
        x, y = self._prepare(batch)
        losses = vmap(self._sample_loss_fn(fixed), in_dims=(None, 0, 0))

        def directional(tangent: dict[str, torch.Tensor]) -> torch.Tensor:
            return jvp(lambda p: losses(p, x, y), (params,), (tangent,))[1]

        result = vmap(directional)(self.split(g))
        return self._check_finite(result.T.contiguous(), "Jacobian products")

    @differentiable_attention
    def mixed_jacobian_prod(self, batch: TorchBatch, g: torch.Tensor) -> torch.Tensor:
        """(N, K, *x.shape[1:]) tensor of ∇_x ⟨∇_θℓ(zᵢ), g_k⟩ (reverse over forward mode)."""
        g = self._check_factor_matrix(g)
        params, fixed = self._params()
        x, y = self._prepare(batch)
        sample_loss = self._sample_loss_fn(fixed)

        def directional(
            xi: torch.Tensor, yi: torch.Tensor, tangent: dict[str, torch.Tensor]
        ) -> torch.Tensor:
            return jvp(lambda p: sample_loss(p, xi, yi), (params,), (tangent,))[1]

        grad_x = grad(directional, argnums=0)
        per_factor = vmap(grad_x, in_dims=(None, None, 0))  # over the K factors
        result = vmap(per_factor, in_dims=(0, 0, None))(x, y, self.split(g))
        return self._check_finite(result, "mixed Jacobian products")

    # ------------------------------------------------------------------ curvature products
    def _vector_chunks(self, n_samples: int, n_vectors: int, per_sample: int = 1) -> int:
        """Vectors per vectorised product: at most MAX_SAMPLE_VECTORS sample-vectors and
        MAX_ACTIVATION_ELEMENTS activation elements (``per_sample`` per sample-vector)."""
        by_samples = MAX_SAMPLE_VECTORS // max(1, n_samples)
        by_activations = MAX_ACTIVATION_ELEMENTS // max(1, n_samples * per_sample)
        return max(1, min(n_vectors, by_samples, by_activations))

    def activation_elements(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Elements the autograd graph of one sample's loss saves for its backward pass
        (counted once per input shape with saved-tensor hooks on one sample): the size of
        the activations a vectorised Hessian product holds per (sample, vector)."""
        key = (tuple(x.shape[1:]), tuple(y.shape[1:]), x.dtype)
        cache: dict[tuple[Any, ...], int] = self.__dict__.setdefault("_activation_cache", {})
        if key not in cache:
            count = [0]
            params, fixed = self._params()
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            weights = {t.untyped_storage().data_ptr() for t in [*params.values(), *fixed.values()]}

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                if tensor.untyped_storage().data_ptr() not in weights:  # not a parameter
                    count[0] += tensor.numel()
                return tensor

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self._sample_loss_fn(fixed)(leaves, x[0], y[0])
            cache[key] = max(1, count[0])
        return cache[key]

    @differentiable_attention
    def hessian_prod_sum(self, batch: TorchBatch, vectors: torch.Tensor) -> torch.Tensor:
        """(K, P): rows Σᵢ ∇²_θ ℓ(zᵢ) v_k over the batch (a sum, not a mean).

        Reverse-over-reverse: the graph of the batch gradient ∇_θ Σᵢ ℓ(zᵢ) is built once
        per call, and its vector-Jacobian product (the Hessian is symmetric, so vᵀH = Hv)
        is vectorised over the K vectors. This is about 1.3-1.5x faster than
        forward-over-reverse (a jvp of the gradient per vector) for MLPs, most of all for
        few vectors, where building the gradient graph dominates. The vectors go through
        in chunks sized by the activations the double backward holds per (sample,
        vector) (``MAX_ACTIVATION_ELEMENTS``), so that it stays in cache; every row goes
        through the same vectorised code, so a row's product does not depend on the
        other rows computed with it.
        """
        params, fixed = self._params()
        x, y = self._prepare(batch)
        losses = vmap(self._sample_loss_fn(fixed), in_dims=(None, 0, 0))

        def total(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return losses(p, x, y).sum()

        gradient_vjp = vjp(grad(total), params)[1]

        def hvp(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return gradient_vjp(tangent)[0]

        batched = vmap(hvp)
        # On the CPU, chunks sized to its caches; a GPU takes all vectors at once.
        per_sample = self.activation_elements(x, y) if x.device.type == "cpu" else 1
        chunk = self._vector_chunks(x.shape[0], vectors.shape[0], per_sample)
        outs = [self.flatten(batched(self.split(v))) for v in torch.split(vectors, chunk)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def gauss_newton_prod_sum(self, batch: TorchBatch, vectors: torch.Tensor) -> torch.Tensor:
        """(K, P): rows Σᵢ gᵢ (gᵢ·v_k) over the batch, with gᵢ the per-sample gradient."""
        g = self.flat_grads(batch)
        return (vectors @ g.T) @ g
