"""EK-FAC: eigenvalue-corrected Kronecker-factored curvature of Linear, Conv2d and Conv1D layers.

Rows are (example, position) pairs (see :mod:`~influence_pipeline.influence.kfac_layers`):
a layer with input rows ã (ã = [a; 1] with a bias) and output gradients s has, per group,

    A = (1/R) Σ_rows ã ãᵀ,    G = (1/R) Σ_rows Σ_k s_k s_kᵀ     (R rows: "expand")

where k runs over the pseudo-losses of the chosen Fisher (see
:mod:`~influence_pipeline.influence.layer_gradients`): ``"exact"`` one per (position, class)
with s = √p_c·∂(−log p_c)/∂y (the Fisher of the model's predictive distribution; for a
single Linear layer and cross-entropy it is also the Hessian), ``"sampled"`` k labels drawn
from that distribution (weights 1/k), ``"empirical"`` the true labels. A = Q_A Λ_A Q_Aᵀ and
G = Q_G Λ_G Q_Gᵀ; the eigenvalues are Λ_G ⊗ Λ_A (K-FAC) or, with ``update_diagonal``
(EK-FAC), the exact diagonal of the chosen Fisher in the Kronecker eigenbasis,

    Λ[o, j] = (1/N) Σᵢ Σ_k ((Q_Gᵀ Dᵢₖ Q_A)[o, j])²,   Dᵢₖ = Σ_t s_ikt ã_itᵀ,

from per-example layer gradients summed over positions (N examples). The damped inverse
applied to a layer gradient V is Q_G ((Q_Gᵀ V Q_A) ⊘ (Λ + λ)) Q_Aᵀ. These are Kronfluence's
definitions (empirical Fisher, explicit damping). Summing the pseudo-loss over classes before
one backward pass, as pyDVL 0.10 does, keeps only a rank-one part of each sample's Fisher;
the per-class passes give the Fisher itself.

The factors are computed apart from their application: :func:`fit_ekfac_factors` fills
:class:`EkfacLayerFactors`; :class:`EkfacOperator` applies one layer's inverse to flat
gradients; :mod:`~influence_pipeline.influence.per_layer` scores from hooks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .batch import iterate_batches
from .finite import all_finite
from .kfac_layers import (
    KfacLayer,
    ModuleSelector,
    NotImplementedLayerRepresentationException,
    select_layers,
)
from .layer_gradients import LossType, batch_rows
from .regularization import check_regularization
from .tensor_operator import TensorOperator

__all__ = [
    "FISHER_TYPES",
    "EkfacLayerFactors",
    "EkfacOperator",
    "NotImplementedLayerRepresentationException",
    "fit_ekfac_factors",
]

FISHER_TYPES = ("exact", "sampled", "empirical")


@dataclass
class EkfacLayerFactors:
    """The fitted EK-FAC state of one layer, with a group axis (G = 1 but for grouped
    convolutions): ``evecs_a`` (G, in_dim, in_dim), ``evecs_g`` (G, out, out), ``diag``
    (G, out, in_dim), in_dim = in_features + bias column; ``kind`` fixes the flat layout."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool
    evecs_a: torch.Tensor
    evecs_g: torch.Tensor
    diag: torch.Tensor
    kind: str = "linear"
    groups: int = 1

    def __post_init__(self) -> None:
        # Row-major whatever produced them (LAPACK's eigenvectors are column-major, a restore
        # reads row-major): live and restored factors take the same matmul path. States saved
        # before the group axis existed are 2-D.
        self.evecs_a = _grouped(self.evecs_a).contiguous()
        self.evecs_g = _grouped(self.evecs_g).contiguous()
        self.diag = _grouped(self.diag).contiguous()

    @property
    def layer(self) -> KfacLayer:
        """The layout of the layer (no module attached)."""
        return KfacLayer(
            self.name,
            torch.nn.Identity(),
            self.kind,
            self.groups,
            self.out_features,
            self.in_features,
            self.has_bias,
        )

    @property
    def parameter_names(self) -> list[str]:
        return self.layer.parameter_names

    @property
    def n_parameters(self) -> int:
        return self.groups * self.out_features * (self.in_features + int(self.has_bias))

    def to(self, device: torch.device | str) -> EkfacLayerFactors:
        return EkfacLayerFactors(
            self.name,
            self.in_features,
            self.out_features,
            self.has_bias,
            self.evecs_a.to(device),
            self.evecs_g.to(device),
            self.diag.to(device),
            self.kind,
            self.groups,
        )

    def rotate(self, matrix: torch.Tensor) -> torch.Tensor:
        """Q_Gᵀ V Q_A for V (..., G, out, in_dim)."""
        return self.evecs_g.transpose(-1, -2) @ matrix @ self.evecs_a

    def unrotate(self, matrix: torch.Tensor) -> torch.Tensor:
        """Q_G V Q_Aᵀ for V (..., G, out, in_dim)."""
        return self.evecs_g @ matrix @ self.evecs_a.transpose(-1, -2)

    def precondition(self, matrix: torch.Tensor, regularization: float | None) -> torch.Tensor:
        """(EK-FAC + λ)⁻¹ V for V (..., G, out, in_dim)."""
        return self.unrotate(self.rotate(matrix) / (self.diag + (regularization or 0.0)))


def _grouped(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.ndim == 2 else t


def check_fisher(fisher: str, fisher_samples: int) -> None:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
    if (
        isinstance(fisher_samples, bool)
        or not isinstance(fisher_samples, int)
        or fisher_samples < 1
    ):
        raise ValueError(f"fisher_samples must be a positive integer, got {fisher_samples!r}.")


def _source(fisher: str) -> str:
    return "loss" if fisher == "empirical" else fisher


def fit_ekfac_factors(
    model: torch.nn.Module,
    data: Iterable[Any],
    update_diagonal: bool = False,
    *,
    layers: OrderedDict[str, KfacLayer] | None = None,
    modules: Sequence[ModuleSelector] | None = None,
    fisher: str = "exact",
    fisher_samples: int = 1,
    seed: int | None = None,
    loss: LossType = F.cross_entropy,
) -> OrderedDict[str, EkfacLayerFactors]:
    """EK-FAC factors of the chosen layers (``layers``, else ``modules=``, else every
    supported layer), streaming ``data`` once (twice with ``update_diagonal``). The model's
    ``.grad`` fields are left untouched. ``loss`` serves the empirical Fisher; ``seed`` the
    sampled one (both passes draw the same labels from a loader in a fixed order)."""
    check_fisher(fisher, fisher_samples)
    if layers is None:
        layers, _ = select_layers(model, modules)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    source = _source(fisher)
    draw_seed = int(torch.seed() % 2**63) if seed is None else seed  # one seed for both passes

    def passes() -> Any:
        generator = None
        if source == "sampled":
            generator = torch.Generator(device=device)
            generator.manual_seed(draw_seed)
        for batch in iterate_batches(data):
            for a, g in batch_rows(
                model,
                layers,
                batch.x,
                batch.y,
                source,
                loss=loss,
                fisher_samples=fisher_samples,
                generator=generator,
            ):
                yield batch, a, g

    a_acc = {
        n: torch.zeros(ly.groups, ly.in_dim, ly.in_dim, dtype=dtype, device=device)
        for n, ly in layers.items()
    }
    g_acc = {
        n: torch.zeros(ly.groups, ly.out_features, ly.out_features, dtype=dtype, device=device)
        for n, ly in layers.items()
    }
    rows = dict.fromkeys(layers, 0)
    n_examples = 0
    last_batch: object = None
    for batch, a, g in passes():
        first = batch is not last_batch
        last_batch = batch
        if first:
            n_examples += len(batch)
        for name in layers:
            _check_finite(g[name], name)
            if first:
                a_acc[name] += torch.einsum("bgti,bgtj->gij", a[name], a[name])
                rows[name] += a[name].shape[0] * a[name].shape[2]
            g_acc[name] += torch.einsum("kbgto,kbgtp->gop", g[name], g[name])
    factors: OrderedDict[str, EkfacLayerFactors] = OrderedDict()
    for name, layer in layers.items():
        A = a_acc[name] / rows[name]
        G = g_acc[name] / rows[name]
        evals_a, evecs_a = torch.linalg.eigh(0.5 * (A + A.transpose(-1, -2)))
        evals_g, evecs_g = torch.linalg.eigh(0.5 * (G + G.transpose(-1, -2)))
        factors[name] = EkfacLayerFactors(
            name,
            layer.in_features,
            layer.out_features,
            layer.has_bias,
            evecs_a,
            evecs_g,
            (evals_g[:, :, None] * evals_a[:, None, :]).clamp_min(0.0),
            layer.kind,
            layer.groups,
        )
    if not all(all_finite(f.diag) for f in factors.values()):
        raise ValueError("EK-FAC factors are not finite: the model outputs contain NaN/inf.")
    if update_diagonal:
        diag_acc = {name: torch.zeros_like(f.diag) for name, f in factors.items()}
        for _, a, g in passes():
            for name, f in factors.items():
                a_kfe = a[name] @ f.evecs_a  # (B, G, T, in)
                g_kfe = g[name] @ f.evecs_g  # (K, B, G, T, out)
                per_example = torch.einsum("kbgto,bgti->kbgoi", g_kfe, a_kfe)
                diag_acc[name] += (per_example**2).sum(dim=(0, 1))
        for name, f in factors.items():
            f.diag = diag_acc[name] / n_examples
    return factors


def _check_finite(g: torch.Tensor, name: str) -> None:
    if not all_finite(g):
        raise ValueError(
            f"EK-FAC: the output gradients of layer {name!r} contain NaN or inf (the model "
            "outputs or the loss are not finite)."
        )


class EkfacOperator(TensorOperator):
    """The damped EK-FAC inverse of one layer on its flat gradient (pyDVL's layout)."""

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
        layer = self.factors.layer
        V = layer.flat_to_matrix(mat)
        return layer.matrix_to_flat(self.factors.precondition(V, self._regularization))
