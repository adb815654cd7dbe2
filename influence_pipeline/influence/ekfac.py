"""EK-FAC: eigenvalue-corrected Kronecker-factored curvature of Linear layers.

For a Linear layer with input rows a (a ones column appended when the layer has a bias,
ã = [a; 1]) and the parameters V = [W | b] (out × (in + 1)), the curvature is the Fisher of
the model's own predictive distribution p = softmax(logits), computed in closed form:

    F = (1/N) Σᵢ Σ_c p_ic vec(g_ic ãᵢᵀ) vec(g_ic ãᵢᵀ)ᵀ,   g_ic = ∇_{layer output} (−log p_ic).

With s_ic = √p_ic · g_ic — the gradient, at the layer output, of the pseudo-loss
√p_c · log p_c with √p_c held constant, one backward pass per class c — K-FAC factors it as
G ⊗ A with

    A = (1/N) Σᵢ ãᵢãᵢᵀ,    G = (1/N) Σᵢ Σ_c s_ic s_icᵀ.

(Summing the pseudo-loss over classes *before* the backward pass, as pyDVL 0.10 does, keeps
only the rank-one (Σ_c s_c)(Σ_c s_c)ᵀ of each sample's G; the per-class passes give the
Fisher itself, which equals the Hessian of the cross-entropy of a single linear layer.)
A = Q_A Λ_A Q_Aᵀ, G = Q_G Λ_G Q_Gᵀ; the eigenvalues are Λ_G ⊗ Λ_A or, with
``update_diagonal``, the exact diagonal of F in the Kronecker eigenbasis,
Λ[o, j] = (1/N) Σᵢ Σ_c (Q_Gᵀ s_ic)_o² (Q_Aᵀ ãᵢ)_j². The damped inverse applied to a layer
gradient V is Q_G ((Q_Gᵀ V Q_A) ⊘ (Λ + λ)) Q_Aᵀ.

The factors are computed apart from their application (:func:`fit_ekfac_factors` fills
:class:`EkfacLayerFactors`; :class:`EkfacOperator` applies one layer's inverse).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .batch import iterate_batches
from .finite import all_finite
from .regularization import check_regularization
from .tensor_operator import TensorOperator


class NotImplementedLayerRepresentationException(ValueError):
    def __init__(self, module_id: str, module: torch.nn.Module) -> None:
        super().__init__(
            f"EK-FAC supports torch.nn.Linear layers only, but module {module_id!r} "
            f"({type(module).__name__}) has trainable parameters. Freeze it or use another method."
        )


@dataclass
class EkfacLayerFactors:
    """The fitted EK-FAC state of one Linear layer."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool
    evecs_a: torch.Tensor  # (in + bias, in + bias)
    evecs_g: torch.Tensor  # (out, out)
    diag: torch.Tensor  # (out, in + bias): eigenvalues in the Kronecker eigenbasis

    def __post_init__(self) -> None:
        # Row-major whatever produced them (LAPACK's eigenvectors are column-major, a restore
        # reads row-major): live and restored factors take the same matmul path.
        self.evecs_a = self.evecs_a.contiguous()
        self.evecs_g = self.evecs_g.contiguous()
        self.diag = self.diag.contiguous()

    @property
    def parameter_names(self) -> list[str]:
        names = [f"{self.name}.weight"]
        if self.has_bias:
            names.append(f"{self.name}.bias")
        return names

    @property
    def n_parameters(self) -> int:
        return self.out_features * (self.in_features + int(self.has_bias))

    def to(self, device: torch.device | str) -> EkfacLayerFactors:
        return EkfacLayerFactors(
            self.name,
            self.in_features,
            self.out_features,
            self.has_bias,
            self.evecs_a.to(device),
            self.evecs_g.to(device),
            self.diag.to(device),
        )


def active_linear_layers(model: torch.nn.Module) -> OrderedDict[str, torch.nn.Linear]:
    """Leaf modules with trainable parameters; each must be a Linear layer whose parameters
    are all trainable."""
    layers: OrderedDict[str, torch.nn.Linear] = OrderedDict()
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        trainable = [p.requires_grad for p in own]
        if not any(trainable):
            continue
        if not isinstance(module, torch.nn.Linear):
            raise NotImplementedLayerRepresentationException(name, module)
        if not all(trainable):
            raise ValueError(
                f"Layer {name!r} has both trainable and frozen parameters; EK-FAC needs all "
                "parameters of a layer trainable or all frozen."
            )
        layers[name] = module
    if not layers:
        raise ValueError("The model has no trainable Linear layers for EK-FAC.")
    return layers


class _LayerTaps:
    """Forward hooks that keep each layer's input rows and output tensor of one batch."""

    def __init__(self, layers: OrderedDict[str, torch.nn.Linear]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()
        ]

    def _hook(self, name: str) -> Any:
        def hook(
            module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            (x,) = args[:1]
            if x.ndim != 2:
                raise ValueError(
                    f"EK-FAC supports Linear layers applied to (N, in) inputs; layer {name!r} "
                    f"received an input of shape {tuple(x.shape)}."
                )
            self.inputs[name] = x.detach()
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _augmented(a: torch.Tensor, has_bias: bool) -> torch.Tensor:
    if not has_bias:
        return a
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)


def _fisher_output_gradients(
    model: torch.nn.Module,
    layers: OrderedDict[str, torch.nn.Linear],
    x: torch.Tensor,
    taps: _LayerTaps,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Layer inputs (N, in) and per-class pseudo-loss gradients s (C, N, out) of one batch."""
    with torch.enable_grad():
        logits = model(x)
        if logits.ndim != 2:
            raise ValueError(
                "EK-FAC needs a classifier with (N, C) logits, got output shape "
                f"{tuple(logits.shape)}."
            )
        with torch.no_grad():
            p = torch.softmax(logits, dim=1)
            n_classes = p.shape[1]
            eye = torch.eye(n_classes, dtype=p.dtype, device=p.device)
            # cotangent of √p_c log p_c (√p_c constant) at the logits: √p_c (e_c − p), per class
            cotangents = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])
        outputs = [taps.outputs[name] for name in layers]
        grads = torch.autograd.grad(
            logits, outputs, grad_outputs=cotangents, is_grads_batched=True, allow_unused=False
        )
    inputs = {name: taps.inputs[name] for name in layers}
    return inputs, {name: g.detach() for name, g in zip(layers, grads, strict=True)}


def fit_ekfac_factors(
    model: torch.nn.Module,
    data: Iterable[Any],
    update_diagonal: bool = False,
) -> OrderedDict[str, EkfacLayerFactors]:
    """EK-FAC factors of every trainable Linear layer, streaming ``data`` once (twice with
    ``update_diagonal``). The model's ``.grad`` fields are left untouched."""
    layers = active_linear_layers(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    a_acc = {
        n: torch.zeros(
            m.in_features + int(m.bias is not None),
            m.in_features + int(m.bias is not None),
            dtype=dtype,
            device=device,
        )
        for n, m in layers.items()
    }
    g_acc = {
        n: torch.zeros(m.out_features, m.out_features, dtype=dtype, device=device)
        for n, m in layers.items()
    }

    def batches() -> Iterable[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]]:
        taps = _LayerTaps(layers)
        try:
            for batch in iterate_batches(data):
                x = (
                    batch.x.to(device=device, dtype=dtype)
                    if batch.x.is_floating_point()
                    else batch.x.to(device)
                )
                inputs, grads = _fisher_output_gradients(model, layers, x, taps)
                yield inputs, grads, x.shape[0]
        finally:
            taps.remove()

    n = 0
    for inputs, grads, size in batches():
        n += size
        for name, layer in layers.items():
            a = _augmented(inputs[name], layer.bias is not None)
            a_acc[name] += a.T @ a
            s = grads[name].reshape(-1, grads[name].shape[-1])
            g_acc[name] += s.T @ s
    factors: OrderedDict[str, EkfacLayerFactors] = OrderedDict()
    for name, layer in layers.items():
        A = a_acc[name] / n
        G = g_acc[name] / n
        evals_a, evecs_a = torch.linalg.eigh(0.5 * (A + A.T))
        evals_g, evecs_g = torch.linalg.eigh(0.5 * (G + G.T))
        factors[name] = EkfacLayerFactors(
            name,
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            evecs_a,
            evecs_g,
            torch.outer(evals_g, evals_a).clamp_min(0.0),
        )
    if not all(all_finite(f.diag) for f in factors.values()):
        raise ValueError("EK-FAC factors are not finite: the model outputs contain NaN/inf.")
    if update_diagonal:
        diag_acc = {name: torch.zeros_like(f.diag) for name, f in factors.items()}
        m = 0
        for inputs, grads, size in batches():
            m += size
            for name, f in factors.items():
                a_kfe = _augmented(inputs[name], f.has_bias) @ f.evecs_a  # (N, in+1)
                s_kfe = grads[name] @ f.evecs_g  # (C, N, out)
                diag_acc[name] += torch.einsum("cno,nj->oj", s_kfe**2, a_kfe**2)
        for name, f in factors.items():
            f.diag = diag_acc[name] / m
    return factors


class EkfacOperator(TensorOperator):
    """The damped EK-FAC inverse of one Linear layer on its flat gradient [vec(W), b]."""

    def __init__(self, factors: EkfacLayerFactors, regularization: float | None = None) -> None:
        self.factors = factors
        self._regularization = check_regularization(regularization)
        self._check_invertible()

    def _check_invertible(self) -> None:
        damped = self.factors.diag + (self._regularization or 0.0)
        if bool((damped <= 0).any()):
            raise ValueError(
                f"EK-FAC curvature of layer {self.factors.name!r} has zero eigenvalues: set a "
                "positive hessian_regularization."
            )

    @property
    def regularization(self) -> float | None:
        return self._regularization

    @regularization.setter
    def regularization(self, value: float | None) -> None:
        self._regularization = check_regularization(value)
        self._check_invertible()

    @property
    def input_size(self) -> int:
        return self.factors.n_parameters

    @property
    def device(self) -> torch.device:
        return self.factors.diag.device

    @property
    def dtype(self) -> torch.dtype:
        return self.factors.diag.dtype

    def to(self, device: torch.device | str) -> EkfacOperator:
        self.factors = self.factors.to(device)
        return self

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        f = self.factors
        k, out, inp = mat.shape[0], f.out_features, f.in_features
        weight = mat[:, : out * inp].reshape(k, out, inp)
        V = (
            torch.cat([weight, mat[:, out * inp :].reshape(k, out, 1)], dim=2)
            if f.has_bias
            else weight
        )
        kfe = f.evecs_g.T @ V @ f.evecs_a
        kfe = kfe / (f.diag + (self._regularization or 0.0))
        V = f.evecs_g @ kfe @ f.evecs_a.T
        if not f.has_bias:
            return V.reshape(k, -1)
        return torch.cat([V[:, :, :inp].reshape(k, -1), V[:, :, inp]], dim=1)
