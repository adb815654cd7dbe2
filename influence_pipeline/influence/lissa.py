"""LissaOperator: (A + λI)⁻¹ by the LiSSA recursion, all right-hand sides at once.

With A_b the curvature of a sampled batch b (mean over its samples), dampening d and
scale s, each right-hand side v iterates

    h_{t+1} = v + (1 − d) h_t − (A_b + λI) h_t / s,   h_0 = v,

and returns h/s. Its fixed point for a fixed batch (a full-batch loader) is
(A + (λ + d·s) I)⁻¹ v: dampening adds d·s to the regularization. The recursion converges
when s exceeds the largest eigenvalue of A + λI (roughly; s > (λ_max + λ)/(2 − d)).

Batches are drawn by reshuffling the loader's dataset each epoch with a generator seeded
at every application, so results are reproducible and, because each right-hand side stops
on its own (‖h_{t+1} − h_t‖ ≤ rtol·‖h_{t+1}‖) and the batch sequence does not depend on
which right-hand sides are active, a right-hand side's result does not depend on the other
right-hand sides solved with it. Every iteration is one batched product for all active
right-hand sides, which are then updated in place; rows are copied only in the
iterations where some right-hand sides stop.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .batch import TorchBatch, as_batch
from .curvature import CurvatureOperator
from .finite import all_finite
from .regularization import check_regularization
from .tensor_operator import TensorOperator

logger = logging.getLogger(__name__)


class LissaOperator(TensorOperator):
    """LiSSA approximation of (A + λI)⁻¹ (see the module docstring).

    Args:
        curvature: the curvature operator A; its data loader supplies the batches.
        regularization: λ ≥ 0 or None.
        maxiter: iteration limit.
        dampen: d in [0, 1).
        scale: s > 0.
        rtol: per right-hand-side stopping tolerance.
        progress: log progress every 100 iterations.
        warn_on_max_iteration: warn (else log at debug level) when maxiter is reached.
        seed: seed of the batch sampling; None draws one from torch's global generator once.
    """

    def __init__(
        self,
        curvature: CurvatureOperator,
        regularization: float | None = None,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: float = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        warn_on_max_iteration: bool = True,
        seed: int | None = None,
    ) -> None:
        if maxiter < 1:
            raise ValueError(f"maxiter must be a positive integer, got {maxiter}.")
        if not 0.0 <= dampen < 1.0:
            raise ValueError(f"dampen must be in [0, 1), got {dampen}.")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        self.curvature = curvature
        self._regularization = check_regularization(regularization)
        self.maxiter = int(maxiter)
        self.dampen = float(dampen)
        self.scale = float(scale)
        self.rtol = float(rtol)
        self.progress = progress
        self.warn_on_max_iteration = warn_on_max_iteration
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.last_iterations = 0

    @property
    def regularization(self) -> float | None:
        return self._regularization

    @regularization.setter
    def regularization(self, value: float | None) -> None:
        self._regularization = check_regularization(value)

    @property
    def input_size(self) -> int:
        return self.curvature.input_size

    @property
    def device(self) -> torch.device:
        return self.curvature.device

    @property
    def dtype(self) -> torch.dtype:
        return self.curvature.dtype

    def to(self, device: torch.device | str) -> LissaOperator:
        self.curvature = self.curvature.to(device)
        return self

    def _batches(self) -> Iterator[TorchBatch]:
        data = self.curvature.data
        loader: object = data
        if (
            isinstance(data, DataLoader)
            and not isinstance(data.dataset, IterableDataset)
            and data.batch_size is not None
        ):
            generator = torch.Generator().manual_seed(self.seed)
            loader = DataLoader(
                data.dataset,
                batch_size=data.batch_size,
                shuffle=True,
                generator=generator,
                collate_fn=data.collate_fn,
                drop_last=data.drop_last,
            )
        while True:
            empty = True
            for item in loader:  # type: ignore[attr-defined]
                empty = False
                yield as_batch(item)
            if empty:
                raise ValueError("The LiSSA data loader yielded no batches.")

    def _apply_to_mat(self, mat: torch.Tensor) -> torch.Tensor:
        # The update is written as h ← h + Δ with
        #   Δ = v − (d + λ/s) h − (Σ_b ∇²ℓ h) / (s·|b|),
        # the same recursion as the module docstring, evaluated in place on the product
        # with one scratch buffer: no (K, P) temporaries beyond the product itself. Every
        # elementwise step rounds once per entry (a scalar product or a sum of two
        # tensors, no fused multiply-add), so a row's result does not depend on where it
        # sits in the tensor. The active right-hand sides are kept compacted in h_work,
        # v_work (at first the whole of ``mat``, with no copy): rows are copied out only
        # when some right-hand sides stop, not at every iteration.
        result = torch.empty_like(mat)
        rows = torch.arange(mat.shape[0], device=mat.device)
        h_work, v_work = mat.clone(), mat
        shrink = self.dampen + (self._regularization or 0.0) / self.scale
        scratch = torch.empty_like(mat) if shrink else None
        batches = self._batches()
        iterations = 0
        for iterations in range(1, self.maxiter + 1):
            batch = next(batches)
            delta = self.curvature.batch_prod_sum(batch, h_work)
            if _shares_memory(delta, h_work, v_work):  # updated in place below
                delta = delta.clone()
            delta.mul_(-1.0 / (self.scale * len(batch)))
            delta.add_(v_work)
            if scratch is not None:
                damped = torch.mul(h_work, shrink, out=scratch[: h_work.shape[0]])
                delta.sub_(damped)
            change = torch.linalg.vector_norm(delta, dim=1)
            h_work.add_(delta)
            norm = torch.linalg.vector_norm(h_work, dim=1)
            if not all_finite(norm):
                if not all_finite(h_work):
                    raise ValueError(
                        "LiSSA diverged (NaN/inf): increase scale (it must exceed the largest "
                        "curvature eigenvalue) or dampen."
                    )
                # Finite entries whose norm overflows the dtype (float16/float32): judge
                # convergence in float64, never as inf <= rtol·inf.
                change = torch.linalg.vector_norm(delta, dim=1, dtype=torch.float64)
                norm = torch.linalg.vector_norm(h_work, dim=1, dtype=torch.float64)
            done = change <= self.rtol * norm
            if bool(done.any()):
                result[rows[done]] = h_work[done]
                still = ~done
                rows, h_work, v_work = rows[still], h_work[still], v_work[still]
            if self.progress and iterations % 100 == 0:
                logger.info(
                    "LiSSA iteration %d: %d right-hand sides active", iterations, rows.numel()
                )
            if rows.numel() == 0:
                break
        self.last_iterations = iterations
        if rows.numel() > 0:
            result[rows] = h_work
            message = (
                f"LiSSA reached maxiter={self.maxiter} with {rows.numel()} right-hand side(s) "
                f"above rtol={self.rtol}; increase maxiter or scale, or dampen."
            )
            if self.warn_on_max_iteration:
                warnings.warn(message, stacklevel=3)
            else:
                logger.debug(message)
        return result.div_(self.scale)


def _shares_memory(tensor: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``tensor`` lives in the storage of one of ``others`` (a curvature product
    that returns a view of its input must not be updated in place)."""
    storage = tensor.untyped_storage().data_ptr()
    return any(storage == other.untyped_storage().data_ptr() for other in others)
