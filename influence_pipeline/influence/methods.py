"""The influence methods, with pyDVL 0.10's constructor arguments and defaults.

Each method only builds the inverse-curvature operator of one parameter block:

=============================  =================================================================
DirectInfluence                dense A (one pass over the data), Cholesky/LU solve of A + λI
CgInfluence                    (block) conjugate gradient on streamed products, preconditioners
LissaInfluence                 the LiSSA recursion on sampled batches
ArnoldiInfluence               top eigenpairs by restarted block Krylov, V (D + λ)⁻¹ Vᵀ
EkfacInfluence                 eigenvalue-corrected K-FAC of Linear layers (one block per layer)
NystroemSketchInfluence        randomized Nyström sketch, Woodbury inverse
InverseHarmonicMeanInfluence   (1/N) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ by Sherman–Morrison
=============================  =================================================================

Arguments beyond pyDVL's (``seed``) come last and default to pyDVL's behaviour.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import BlockStructure
from .cg import CgOperator
from .composable import RegularizationType, TorchComposableInfluence
from .composition import TorchBlockMapper, TorchOperatorGradientComposition
from .compressed import LayerQuery, QueryFactors, check_rank
from .curvature import curvature_operator
from .direct import DirectSolveOperator
from .ekfac import EkfacLayerFactors, EkfacOperator, check_fisher, fit_ekfac_factors
from .finite import all_finite
from .gradient_provider import LossType
from .ihm import InverseHarmonicMeanOperator
from .influence_model import fit_required
from .kfac_layers import ModuleSelector, select_layers
from .lissa import LissaOperator
from .low_rank import LowRankOperator, LowRankProductRepresentation
from .per_layer import PerLayerScorer
from .preconditioner import JacobiPreconditioner, NystroemPreconditioner, Preconditioner
from .spectral import operator_nystroem_approximation, operator_spectral_approximation
from .state import JSON, BlockState
from .types import BlockMode, InfluenceMode, SecondOrderMode


def _check_mode(mode: SecondOrderMode) -> SecondOrderMode:
    if not isinstance(mode, SecondOrderMode):
        raise TypeError(f"second_order_mode must be a SecondOrderMode, got {mode!r}.")
    return mode


class DirectInfluence(TorchComposableInfluence):
    """Exact inverse of each block's curvature: A_B is formed densely (P_B × P_B, one pass
    over the data) and A_B + λ_B I is factored once.

    Args:
        model, loss: the model and its loss ``loss(output, target)``.
        regularization: λ ≥ 0 for every block, or a mapping block → λ | None.
        block_structure: a :class:`BlockMode` or a mapping block → parameter names.
        second_order_mode: Hessian or Gauss-Newton curvature.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        regularization: RegularizationType = None,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ) -> None:
        self.loss = loss
        self.second_order_mode = _check_mode(second_order_mode)
        super().__init__(model, block_structure, regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        op = DirectSolveOperator(curvature.dense(), regularization=regularization)
        return TorchOperatorGradientComposition(op, self._gradient_provider(block_params))

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        return {}, {"matrix": composition.op.matrix}

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        op = DirectSolveOperator(block.tensors["matrix"], block.attrs["regularization"])
        return TorchOperatorGradientComposition(op, self._gradient_provider(block.parameters))


class CgInfluence(TorchComposableInfluence):
    """Conjugate gradient on streamed curvature products, all right-hand sides per batched
    product (see :mod:`~influence_pipeline.influence.cg`).

    Args:
        model, loss, regularization, block_structure, second_order_mode: as DirectInfluence.
        rtol, atol: stop a right-hand side at ‖r‖ ≤ max(rtol·‖b‖, atol).
        maxiter: iteration limit (default 10·P).
        progress: log progress.
        precompute_grad: accepted for pyDVL compatibility (no effect).
        preconditioner: a :class:`Preconditioner`; a copy is fitted for every block.
        solve_simultaneously: block CG instead of per-RHS CG.
        warn_on_max_iteration: warn when maxiter is reached.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        regularization: RegularizationType = None,
        rtol: float = 1e-4,
        atol: float = 1e-6,
        maxiter: int | None = None,
        progress: bool = False,
        precompute_grad: bool = False,
        preconditioner: Preconditioner | None = None,
        solve_simultaneously: bool = False,
        warn_on_max_iteration: bool = True,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ) -> None:
        self.loss = loss
        self.rtol = rtol
        self.atol = atol
        self.maxiter = maxiter
        self.progress = progress
        self.precompute_grad = precompute_grad
        if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
            raise TypeError(
                f"preconditioner must be a Preconditioner, got {type(preconditioner).__name__}."
            )
        self.preconditioner = preconditioner
        self.solve_simultaneously = solve_simultaneously
        self.warn_on_max_iteration = warn_on_max_iteration
        self.second_order_mode = _check_mode(second_order_mode)
        super().__init__(model, block_structure, regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        preconditioner = None
        if self.preconditioner is not None:
            preconditioner = copy.deepcopy(self.preconditioner).fit(curvature, regularization)
        op = CgOperator(
            curvature,
            regularization,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            progress=self.progress,
            preconditioner=preconditioner,
            use_block_cg=self.solve_simultaneously,
            warn_on_max_iteration=self.warn_on_max_iteration,
        )
        return TorchOperatorGradientComposition(op, self._gradient_provider(block_params))

    _needs_fit_data_at_query = True

    def _config(self) -> dict[str, JSON]:
        return {
            **super()._config(),
            "rtol": self.rtol,
            "atol": self.atol,
            "maxiter": self.maxiter,
            "progress": self.progress,
            "precompute_grad": self.precompute_grad,
            "preconditioner": None if self.preconditioner is None else self.preconditioner.config(),
            "solve_simultaneously": self.solve_simultaneously,
            "warn_on_max_iteration": self.warn_on_max_iteration,
        }

    @classmethod
    def _from_config(
        cls, model: torch.nn.Module, loss: LossType, config: Mapping[str, JSON]
    ) -> TorchComposableInfluence:
        config = dict(config)
        config["preconditioner"] = _preconditioner_from_config(config.get("preconditioner"))
        return super()._from_config(model, loss, config)

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        op = composition.op
        tensors = {}
        if op.preconditioner is not None:
            tensors = {
                f"preconditioner.{k}": t for k, t in op.preconditioner.state_tensors().items()
            }
        return {}, tensors

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        assert data is not None
        reg = block.attrs["regularization"]
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block.parameters
        )
        preconditioner = None
        if self.preconditioner is not None:
            preconditioner = copy.deepcopy(self.preconditioner)
            prefix = "preconditioner."
            preconditioner.load_state_tensors(
                {k[len(prefix) :]: t for k, t in block.tensors.items() if k.startswith(prefix)}, reg
            )
        op = CgOperator(
            curvature,
            reg,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            progress=self.progress,
            preconditioner=preconditioner,
            use_block_cg=self.solve_simultaneously,
            warn_on_max_iteration=self.warn_on_max_iteration,
        )
        return TorchOperatorGradientComposition(op, self._gradient_provider(block.parameters))


class LissaInfluence(TorchComposableInfluence):
    """LiSSA (see :mod:`~influence_pipeline.influence.lissa`): returns
    (A + (λ + dampen·scale) I)⁻¹ at convergence.

    Args:
        model, loss, regularization, block_structure, second_order_mode: as DirectInfluence.
        maxiter, dampen, scale, rtol: the recursion's parameters.
        progress, warn_on_max_iteration: logging.
        seed: seed of the batch sampling (extra to pyDVL; None draws one at fit time).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        regularization: RegularizationType = None,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: float = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        warn_on_max_iteration: bool = True,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        seed: int | None = None,
    ) -> None:
        self.loss = loss
        self.maxiter = maxiter
        self.dampen = dampen
        self.scale = scale
        self.rtol = rtol
        self.progress = progress
        self.warn_on_max_iteration = warn_on_max_iteration
        self.second_order_mode = _check_mode(second_order_mode)
        self.seed = seed
        super().__init__(model, block_structure, regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        op = LissaOperator(
            curvature,
            regularization,
            maxiter=self.maxiter,
            dampen=self.dampen,
            scale=self.scale,
            rtol=self.rtol,
            progress=self.progress,
            warn_on_max_iteration=self.warn_on_max_iteration,
            seed=self.seed,
        )
        return TorchOperatorGradientComposition(op, self._gradient_provider(block_params))

    _needs_fit_data_at_query = True

    def _config(self) -> dict[str, JSON]:
        return {
            **super()._config(),
            "maxiter": self.maxiter,
            "dampen": self.dampen,
            "scale": self.scale,
            "rtol": self.rtol,
            "progress": self.progress,
            "warn_on_max_iteration": self.warn_on_max_iteration,
            "seed": self.seed,
        }

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        return {"seed": composition.op.seed}, {}

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        assert data is not None
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block.parameters
        )
        op = LissaOperator(
            curvature,
            block.attrs["regularization"],
            maxiter=self.maxiter,
            dampen=self.dampen,
            scale=self.scale,
            rtol=self.rtol,
            progress=self.progress,
            warn_on_max_iteration=self.warn_on_max_iteration,
            seed=block.attrs["seed"],
        )
        return TorchOperatorGradientComposition(op, self._gradient_provider(block.parameters))


class ArnoldiInfluence(TorchComposableInfluence):
    """Low-rank inverse from the top ``rank`` eigenpairs (largest |λ|) of each block's
    curvature, found by a restarted block Krylov (Lanczos/Arnoldi) method on streamed
    products; V (D + λ)⁻¹ Vᵀ, plus (1/λ)(I − VVᵀ) with ``use_woodbury``.

    Args:
        model, loss, regularization, block_structure, second_order_mode: as DirectInfluence.
        rank: number of eigenpairs per block.
        krylov_dimension: Krylov basis size (default min(P, max(2·rank + 1, 20))).
        tol: eigenpair residual tolerance relative to the largest eigenvalue.
        max_iter: maximum number of restarts.
        eigen_computation_on_gpu: accepted for pyDVL compatibility: the eigen computation
            always runs on the model's device.
        use_woodbury: add the (1/λ)(I − VVᵀ) term (needs λ > 0).
        seed: seed of the Krylov start block (extra to pyDVL).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        regularization: RegularizationType = None,
        rank: int = 10,
        krylov_dimension: int | None = None,
        tol: float = 1e-6,
        max_iter: int | None = None,
        eigen_computation_on_gpu: bool = False,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        use_woodbury: bool = False,
        seed: int | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}.")
        self.loss = loss
        self.rank = rank
        self.krylov_dimension = krylov_dimension
        self.tol = tol
        self.max_iter = max_iter
        self.eigen_computation_on_gpu = eigen_computation_on_gpu
        self.use_woodbury = use_woodbury
        self.second_order_mode = _check_mode(second_order_mode)
        self.seed = seed
        self._requires_positive_regularization = bool(use_woodbury)
        super().__init__(model, block_structure, regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        representation = operator_spectral_approximation(
            curvature,
            self.rank,
            krylov_dimension=self.krylov_dimension,
            tol=self.tol,
            max_iter=self.max_iter,
            seed=self.seed,
        )
        op = LowRankOperator(representation, regularization, exact=self.use_woodbury)
        return TorchOperatorGradientComposition(op, self._gradient_provider(block_params))

    def _config(self) -> dict[str, JSON]:
        return {
            **super()._config(),
            "rank": self.rank,
            "krylov_dimension": self.krylov_dimension,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "eigen_computation_on_gpu": self.eigen_computation_on_gpu,
            "use_woodbury": self.use_woodbury,
            "seed": self.seed,
        }

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        return _low_rank_state(composition)

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        return _restore_low_rank(self, block, exact=self.use_woodbury)


class NystroemSketchInfluence(TorchComposableInfluence):
    """Randomized Nyström approximation U Λ Uᵀ of each block's curvature from one batched
    product of ``rank`` vectors, inverted by Woodbury:
    U (Λ + λI)⁻¹ Uᵀ + (1/λ)(I − UUᵀ). Needs λ > 0.

    Args:
        model, loss, block_structure, second_order_mode: as DirectInfluence.
        regularization: λ > 0 (float or per-block mapping).
        rank: sketch size.
        seed: seed of the sketch (extra to pyDVL).
    """

    _requires_positive_regularization = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        regularization: float | Mapping[str, float],
        rank: int,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        seed: int | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}.")
        self.loss = loss
        self.rank = rank
        self.second_order_mode = _check_mode(second_order_mode)
        self.seed = seed
        super().__init__(model, block_structure, regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        representation = operator_nystroem_approximation(curvature, self.rank, seed=self.seed)
        op = LowRankOperator(representation, regularization, exact=True)
        return TorchOperatorGradientComposition(op, self._gradient_provider(block_params))

    def _config(self) -> dict[str, JSON]:
        return {**super()._config(), "rank": self.rank, "seed": self.seed}

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        return _low_rank_state(composition)

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        return _restore_low_rank(self, block, exact=True)


class InverseHarmonicMeanInfluence(TorchComposableInfluence):
    """Replace A⁻¹ by (1/N) Σᵢ (gᵢgᵢᵀ + λI)⁻¹ (see :mod:`~influence_pipeline.influence.ihm`);
    every application streams the fit data once. Needs λ > 0 for every block.

    Args:
        model, loss, block_structure: as DirectInfluence.
        regularization: λ > 0 (float or a mapping that covers every block).
    """

    _requires_positive_regularization = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossType,
        regularization: float | Mapping[str, float],
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        self.loss = loss
        super().__init__(model, block_structure, regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:
        assert regularization is not None
        op = InverseHarmonicMeanOperator(self.model, self.loss, data, regularization, block_params)
        return TorchOperatorGradientComposition(op, self._gradient_provider(block_params))

    _needs_fit_data_at_query = True

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        return {}, {}

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        assert data is not None
        return self._create_block(block.parameters, data, block.attrs["regularization"])


class EkfacInfluence(TorchComposableInfluence):
    """EK-FAC / K-FAC: one block per supported layer (``torch.nn.Linear`` with any leading
    dimensions, ``torch.nn.Conv2d``, Hugging Face ``Conv1D``), named after the module; see
    :mod:`~influence_pipeline.influence.ekfac` for the maths and
    :mod:`~influence_pipeline.influence.per_layer` for the scoring, which works layer by
    layer from hooks and never forms a whole per-example gradient (Up mode; Perturbation
    mode takes the flat gradient path).

    Args:
        model: the model; outputs (B, C), (B, T, V) or an object with ``.logits``; inputs
            may be integer token tensors. Put it in eval mode (no dropout).
        update_diagonal: refit the eigenvalues in the Kronecker eigenbasis (EK-FAC) instead
            of the K-FAC products Λ_G ⊗ Λ_A (one more pass over the data).
        hessian_regularization: λ ≥ 0 added to every layer's eigenvalues.
        progress: accepted for pyDVL compatibility.
        fisher: ``"exact"`` (one backward pass per output entry; small outputs only),
            ``"sampled"`` (``fisher_samples`` labels drawn from the model's predictive
            distribution, seeded by ``seed``) or ``"empirical"`` (the true labels).
        loss: the per-example loss ``loss(output, target)`` (summed over positions for a
            sequence); default cross-entropy. It gives the gradients that are scored and the
            empirical Fisher; exact and sampled use the softmax of the outputs.
        modules: the layers that take part: names (a layer, or a container of layers) and/or
            types; default every supported layer with a trainable weight. Other trainable
            parameters are left out, logged and listed in ``excluded_parameters``.
        batch_size: examples per forward/backward pass when scoring.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        update_diagonal: bool = False,
        hessian_regularization: float = 0.0,
        progress: bool = False,
        *,
        fisher: str = "exact",
        fisher_samples: int = 1,
        seed: int | None = None,
        loss: LossType | None = None,
        modules: Sequence[ModuleSelector] | None = None,
        batch_size: int = 32,
    ) -> None:
        check_fisher(fisher, fisher_samples)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.loss = F.cross_entropy if loss is None else loss
        self.update_diagonal = update_diagonal
        self.hessian_regularization = hessian_regularization
        self.progress = progress
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.seed = seed
        self.batch_size = batch_size
        layers, excluded = select_layers(model, modules)
        self.active_layers = layers
        #: Trainable parameters outside the factored layers (not part of the influence).
        self.excluded_parameters = excluded
        block_structure = OrderedDict(
            (name, layer.parameter_names) for name, layer in layers.items()
        )
        super().__init__(model, block_structure, hessian_regularization)

    @property
    def is_thread_safe(self) -> bool:
        return False

    @property
    def modules(self) -> list[str]:
        """Names of the factored layers."""
        return list(self.active_layers)

    def _create_block(
        self, block_params: list[str], data: Iterable[Any], regularization: float | None
    ) -> TorchOperatorGradientComposition[Any]:  # pragma: no cover - fitted jointly
        raise NotImplementedError("EK-FAC fits all layers in one pass; see _create_block_mapper.")

    def _create_block_mapper(self, data: Iterable[Any]) -> TorchBlockMapper:
        factors = fit_ekfac_factors(
            self.model,
            data,
            self.update_diagonal,
            layers=self.active_layers,
            fisher=self.fisher,
            fisher_samples=self.fisher_samples,
            seed=self.seed,
            loss=self.loss,
        )
        return self._mapper_from_factors(factors)

    def _mapper_from_factors(self, factors: Mapping[str, EkfacLayerFactors]) -> TorchBlockMapper:
        blocks: OrderedDict[str, TorchOperatorGradientComposition[Any]] = OrderedDict()
        for name, names in self.parameter_blocks.items():
            op = EkfacOperator(factors[name], self._regularization_dict[name])
            blocks[name] = TorchOperatorGradientComposition(op, self._gradient_provider(names))
        return TorchBlockMapper(blocks)

    def _config(self) -> dict[str, JSON]:
        return {
            "update_diagonal": self.update_diagonal,
            "hessian_regularization": self.hessian_regularization,
            "progress": self.progress,
            "fisher": self.fisher,
            "fisher_samples": self.fisher_samples,
            "seed": self.seed,
            "modules": self.modules,
            "batch_size": self.batch_size,
        }

    @classmethod
    def _from_config(
        cls, model: torch.nn.Module, loss: LossType, config: Mapping[str, JSON]
    ) -> TorchComposableInfluence:
        return cls(model, loss=loss, **config)

    def _block_state(
        self, composition: TorchOperatorGradientComposition[Any]
    ) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
        f = composition.op.factors
        attrs = {
            "in_features": f.in_features,
            "out_features": f.out_features,
            "has_bias": f.has_bias,
            "kind": f.kind,
            "groups": f.groups,
        }
        return attrs, {"evecs_a": f.evecs_a, "evecs_g": f.evecs_g, "diag": f.diag}

    def _restore_block(
        self, block: BlockState, data: Iterable[Any] | None
    ) -> TorchOperatorGradientComposition[Any]:
        factors = EkfacLayerFactors(
            block.name,
            int(block.attrs["in_features"]),
            int(block.attrs["out_features"]),
            bool(block.attrs["has_bias"]),
            block.tensors["evecs_a"],
            block.tensors["evecs_g"],
            block.tensors["diag"],
            str(block.attrs.get("kind", "linear")),
            int(block.attrs.get("groups", 1)),
        )
        op = EkfacOperator(factors, block.attrs["regularization"])
        return TorchOperatorGradientComposition(op, self._gradient_provider(block.parameters))

    # ------------------------------------------------------------------ per-layer queries
    def _scorer(self) -> PerLayerScorer:
        factors = {name: comp.op.factors for name, comp in self._mapper.items()}  # type: ignore[attr-defined]
        regularization = {name: comp.op.regularization for name, comp in self._mapper.items()}  # type: ignore[attr-defined]
        return PerLayerScorer(
            self.model, self.active_layers, factors, regularization, self.loss, self.batch_size
        )

    def _flat_to_queries(self, factors: torch.Tensor) -> QueryFactors:
        if not isinstance(factors, torch.Tensor):
            raise TypeError(
                "Influence factors must be a torch.Tensor (N, P) or the QueryFactors of "
                f"compressed_factors(), got {type(factors).__name__}."
            )
        if factors.ndim == 1:
            factors = factors.unsqueeze(0)
        if factors.ndim != 2 or factors.shape[1] != self.n_parameters:
            raise ValueError(
                f"Influence factors must have shape (N, {self.n_parameters}), got "
                f"{tuple(factors.shape)}."
            )
        if not all_finite(factors):
            raise ValueError("Influence factors contain NaN or inf.")
        factors = factors.to(device=self.model_device, dtype=self.model_dtype)
        split = torch.split(factors, list(self.block_sizes.values()), dim=1)
        return QueryFactors(
            OrderedDict(
                (name, LayerQuery(dense=layer.flat_to_matrix(part)))
                for (name, layer), part in zip(self.active_layers.items(), split, strict=True)
            )
        )

    @fit_required
    def compressed_factors(
        self, x: torch.Tensor, y: torch.Tensor, rank: int | None = None
    ) -> QueryFactors:
        """Per-layer query factors of (x, y): the preconditioned gradient matrices, truncated
        to ``rank`` (``None``: exact; a layer whose smaller side is ≤ rank stays exact).
        Score them with :meth:`influences_from_factors`."""
        return self._scorer().query_factors(x, y, check_rank(rank))

    @fit_required
    def influence_factors_by_block(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        matrices = self._scorer().preconditioned(x, y)
        return OrderedDict(
            (name, self.active_layers[name].matrix_to_flat(m)) for name, m in matrices.items()
        )

    def _influences(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        mode: InfluenceMode,
    ) -> torch.Tensor:
        if mode is not InfluenceMode.Up:
            return super()._influences(x_test, y_test, x, y, mode)
        return _sum_layers(self.influences_by_block(x_test, y_test, x, y, mode))

    @fit_required
    def influences_by_block(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, torch.Tensor]:
        """Influences of each layer (their sum is :meth:`influences`)."""
        if mode is not InfluenceMode.Up:
            return super().influences_by_block(x_test, y_test, x, y, mode)
        if (x is None) != (y is None):
            raise ValueError("Pass both x and y, or neither.")
        scorer = self._scorer()
        queries = scorer.query_factors(x_test, y_test, None)
        if x is None or y is None:
            x, y = x_test, y_test
        return scorer.scores(queries, x, y)

    @fit_required
    def influences_from_factors(
        self,
        z_test_factors: torch.Tensor | QueryFactors,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        """Scores of (x, y) against flat factors (N_test, P) or the per-layer (compressed)
        factors of :meth:`compressed_factors`, without expanding them."""
        if mode is not InfluenceMode.Up:
            if isinstance(z_test_factors, QueryFactors):
                raise ValueError("Perturbation influences need flat (N, P) factors.")
            return super().influences_from_factors(z_test_factors, x, y, mode)
        return _sum_layers(self.influences_from_factors_by_block(z_test_factors, x, y, mode))

    @fit_required
    def influences_from_factors_by_block(
        self,
        z_test_factors: torch.Tensor | OrderedDict[str, torch.Tensor] | QueryFactors,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, torch.Tensor]:
        if mode is not InfluenceMode.Up or isinstance(z_test_factors, Mapping):
            if isinstance(z_test_factors, QueryFactors):
                raise ValueError("Perturbation influences need flat (N, P) factors.")
            return super().influences_from_factors_by_block(z_test_factors, x, y, mode)
        queries = (
            z_test_factors
            if isinstance(z_test_factors, QueryFactors)
            else self._flat_to_queries(z_test_factors)
        )
        return self._scorer().scores(queries, x, y)

    @fit_required
    def self_influences(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """⟨(EK-FAC + λ)⁻¹∇ℓ(zᵢ), ∇ℓ(zᵢ)⟩ for each sample, (N,), layer by layer."""
        return _sum_layers(self._scorer().self_scores(x, y))

    # pyDVL's layer-named spellings of the block-wise queries
    def influences_by_layer(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, torch.Tensor]:
        return self.influences_by_block(x_test, y_test, x, y, mode)

    def influence_factors_by_layer(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        return self.influence_factors_by_block(x, y)

    def influences_from_factors_by_layer(
        self,
        z_test_factors: torch.Tensor | OrderedDict[str, torch.Tensor] | QueryFactors,
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> OrderedDict[str, torch.Tensor]:
        return self.influences_from_factors_by_block(z_test_factors, x, y, mode)

    @fit_required
    def explore_hessian_regularization(
        self, x: torch.Tensor, y: torch.Tensor, regularization_values: Sequence[float]
    ) -> dict[float, dict[str, torch.Tensor]]:
        """Symmetric per-layer influences of (x, y) for several λ, from one gradient pass."""
        scorer = self._scorer()
        grads = scorer.gradients(x, y)
        result: dict[float, dict[str, torch.Tensor]] = {}
        for value in regularization_values:
            per_layer = {}
            for name, d in grads.items():
                m = scorer.factors[name].precondition(d, value)
                per_layer[name] = m.flatten(1) @ d.flatten(1).T
            result[float(value)] = per_layer
        return result


def _sum_layers(per_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
    values = iter(per_layer.values())
    total = next(values).clone()
    for value in values:
        total += value
    return total


def _preconditioner_from_config(config: JSON) -> Preconditioner | None:
    if config is None:
        return None
    kind = config.get("type")
    if kind == "JacobiPreconditioner":
        return JacobiPreconditioner(config["num_samples_estimator"], seed=config.get("seed"))
    if kind == "NystroemPreconditioner":
        return NystroemPreconditioner(config["rank"], seed=config.get("seed"))
    raise ValueError(f"Unknown preconditioner {kind!r} in the fitted state.")


def _low_rank_state(
    composition: TorchOperatorGradientComposition[Any],
) -> tuple[dict[str, JSON], dict[str, torch.Tensor]]:
    representation = composition.op.low_rank_representation
    return {}, {"eigen_vals": representation.eigen_vals, "projections": representation.projections}


def _restore_low_rank(
    influence: TorchComposableInfluence, block: BlockState, exact: bool
) -> TorchOperatorGradientComposition[Any]:
    representation = LowRankProductRepresentation(
        block.tensors["eigen_vals"], block.tensors["projections"]
    )
    op = LowRankOperator(representation, block.attrs["regularization"], exact=exact)
    return TorchOperatorGradientComposition(op, influence._gradient_provider(block.parameters))
