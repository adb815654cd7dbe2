"""The influence engine: pure torch, pyDVL 0.10-compatible names.

Switching from pyDVL is a change of import::

    from influence_pipeline.influence import CgInfluence, BlockMode, InfluenceMode

Conventions (see DESIGN.md §3): per-sample loss ℓ(θ; xᵢ, yᵢ) = loss(model(xᵢ[None]), yᵢ[None]);
curvature of a block = Hessian of the mean loss over the N fit samples (or (1/N) Σ gᵢgᵢᵀ)
plus λI; factors A⁻¹∇ℓ(z_test) concatenated over blocks, shape (N_test, P); Up influence
I[i, j] = ⟨A⁻¹∇ℓ(z_test_i), ∇ℓ(z_j)⟩ with no minus sign — positive means training point j
helps test point i (up-weighting it lowers the test loss), negative means it hurts.
"""

from .batch import TorchBatch
from .bilinear_forms import DictBilinearForm, LowRankBilinearForm, OperatorBilinearForm
from .blocks import build_parameter_blocks
from .cg import CgOperator
from .composable import TorchComposableInfluence
from .composition import TorchBlockMapper, TorchOperatorGradientComposition
from .compressed import LayerQuery, QueryFactors
from .curvature import CurvatureOperator, GaussNewtonOperator, HessianOperator
from .direct import DirectSolveOperator
from .ekfac import (
    EkfacLayerFactors,
    EkfacOperator,
    NotImplementedLayerRepresentationException,
    fit_ekfac_factors,
)
from .gradient_provider import LossType, TorchGradientProvider
from .ihm import InverseHarmonicMeanOperator
from .influence_model import ComposableInfluence, InfluenceFunctionModel
from .kfac_layers import KfacLayer, select_layers
from .lissa import LissaOperator
from .low_rank import LowRankOperator, LowRankProductRepresentation
from .methods import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from .preconditioner import JacobiPreconditioner, NystroemPreconditioner, Preconditioner
from .spectral import (
    operator_nystroem_approximation,
    operator_spectral_approximation,
    randomized_nystroem_approximation,
)
from .state import BlockState, FittedState, fitted_state, restore_influence
from .tensor_operator import MatrixOperator, TensorDictOperator, TensorOperator
from .types import (
    Batch,
    BilinearForm,
    BlockMapper,
    BlockMode,
    GradientProvider,
    InfluenceMode,
    NotFittedException,
    Operator,
    OperatorGradientComposition,
    SecondOrderMode,
    UnsupportedInfluenceModeException,
)

__all__ = [
    "ArnoldiInfluence",
    "Batch",
    "BilinearForm",
    "BlockMapper",
    "BlockMode",
    "BlockState",
    "CgInfluence",
    "CgOperator",
    "ComposableInfluence",
    "CurvatureOperator",
    "DictBilinearForm",
    "DirectInfluence",
    "DirectSolveOperator",
    "EkfacInfluence",
    "EkfacLayerFactors",
    "EkfacOperator",
    "FittedState",
    "GaussNewtonOperator",
    "GradientProvider",
    "HessianOperator",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "InverseHarmonicMeanInfluence",
    "InverseHarmonicMeanOperator",
    "JacobiPreconditioner",
    "KfacLayer",
    "LayerQuery",
    "LissaInfluence",
    "LissaOperator",
    "LossType",
    "LowRankBilinearForm",
    "LowRankOperator",
    "LowRankProductRepresentation",
    "MatrixOperator",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
    "NystroemPreconditioner",
    "NystroemSketchInfluence",
    "Operator",
    "OperatorBilinearForm",
    "OperatorGradientComposition",
    "Preconditioner",
    "QueryFactors",
    "SecondOrderMode",
    "TensorDictOperator",
    "TensorOperator",
    "TorchBatch",
    "TorchBlockMapper",
    "TorchComposableInfluence",
    "TorchGradientProvider",
    "TorchOperatorGradientComposition",
    "UnsupportedInfluenceModeException",
    "build_parameter_blocks",
    "fit_ekfac_factors",
    "fitted_state",
    "operator_nystroem_approximation",
    "operator_spectral_approximation",
    "randomized_nystroem_approximation",
    "restore_influence",
    "select_layers",
]
