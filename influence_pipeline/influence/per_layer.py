"""Influence scores layer by layer, from activations and output gradients (no n × P).

With block-diagonal (per-layer) curvature the score of a training example j for a test
example i is a sum over layers,

    I[i, j] = Σ_layers ⟨Mᵢ, Dⱼ⟩,   Dⱼ = Σ_t g_jt ã_jtᵀ,   Mᵢ = (EK-FAC + λ)⁻¹ Dᵢ,

and one forward and backward pass of a training batch gives ã and g of every layer (hooks,
:mod:`~influence_pipeline.influence.layer_gradients`). A training example's whole gradient is
never formed: the batch's Dⱼ of one layer at a time (B × layer size) is contracted with the
queries and dropped. With compressed queries Mᵢ ≈ LᵢRᵢ the score is Σ_t (Lᵢᵀ g_jt)·(Rᵢ ã_jt), or,
where that costs more multiply-adds (long sequences, see :func:`low_rank_route`), LᵢRᵢ of a
block of test rows at a time against Dⱼ; intermediates are chunked over test rows to stay
under :data:`MAX_CHUNK_ELEMENTS`. Self-influences
⟨(EK-FAC + λ)⁻¹Dᵢ, Dᵢ⟩ are Σ (Q_Gᵀ Dᵢ Q_A)² ⊘ (Λ + λ) in the Kronecker eigenbasis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from .compressed import LayerQuery, QueryFactors, compress
from .ekfac import EkfacLayerFactors
from .finite import all_finite
from .kfac_layers import KfacLayer
from .layer_gradients import LossType, batch_rows

#: Bound on the elements of one intermediate of the low-rank contraction.
MAX_CHUNK_ELEMENTS = 1 << 25


class PerLayerScorer:
    """Scores of the fitted EK-FAC layers (``factors`` and λ by layer) on ``model``."""

    def __init__(
        self,
        model: torch.nn.Module,
        layers: OrderedDict[str, KfacLayer],
        factors: Mapping[str, EkfacLayerFactors],
        regularization: Mapping[str, float | None],
        loss: LossType = F.cross_entropy,
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.layers = layers
        self.factors = factors
        self.regularization = regularization
        self.loss = loss
        self.batch_size = batch_size

    def _batches(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Per-example layer gradients' ingredients: (ã (B, G, T, in), g (B, G, T, out))."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same first dimension, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}."
            )
        for start in range(0, x.shape[0], self.batch_size):
            stop = start + self.batch_size
            for a, g in batch_rows(
                self.model, self.layers, x[start:stop], y[start:stop], "loss", loss=self.loss
            ):
                yield a, {n: t[0] for n, t in g.items()}

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Per-example layer gradients D (N, G, out, in_dim) by layer (N × P: small N only)."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for a, g in self._batches(x, y):
            for name in self.layers:
                parts[name].append(_example_gradients(a[name], g[name]))
        return OrderedDict((n, torch.cat(p)) for n, p in parts.items())

    def preconditioned(self, x: torch.Tensor, y: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Mᵢ = (EK-FAC + λ)⁻¹ Dᵢ by layer, (N, G, out, in_dim)."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for a, g in self._batches(x, y):
            for name in self.layers:
                f = self.factors[name]
                # rotate the rows first: Q_Gᵀ D Q_A = Σ_t (Q_Gᵀ g_t)(Q_Aᵀ ã_t)ᵀ
                kfe = torch.einsum("bgto,bgti->bgoi", g[name] @ f.evecs_g, a[name] @ f.evecs_a)
                kfe = kfe / (f.diag + (self.regularization[name] or 0.0))
                parts[name].append(f.unrotate(kfe))
        return OrderedDict((n, torch.cat(p)) for n, p in parts.items())

    def query_factors(self, x: torch.Tensor, y: torch.Tensor, rank: int | None) -> QueryFactors:
        layers: OrderedDict[str, list[LayerQuery]] = OrderedDict()
        for start in range(0, x.shape[0], self.batch_size):
            stop = start + self.batch_size
            block = self.preconditioned(x[start:stop], y[start:stop])
            for name, m in block.items():
                layers.setdefault(name, []).append(compress(m, rank))
        merged: OrderedDict[str, LayerQuery] = OrderedDict()
        for name, parts in layers.items():
            keys = list(parts[0].tensors())
            merged[name] = LayerQuery(
                **{k: torch.cat([p.tensors()[k] for p in parts]) for k in keys}
            )
        return QueryFactors(merged, rank)

    def scores(
        self, queries: QueryFactors, x: torch.Tensor, y: torch.Tensor
    ) -> OrderedDict[str, torch.Tensor]:
        """⟨Mᵢ, Dⱼ⟩ by layer, (n_test, N), streaming (x, y) in batches."""
        missing = [n for n in self.layers if n not in queries.layers]
        if missing:
            raise ValueError(
                f"The query factors have layers {list(queries.layers)} but the model's EK-FAC "
                f"layers are {list(self.layers)} (missing {missing}): they were computed with "
                "other modules=."
            )
        device, dtype = self.factors[next(iter(self.layers))].diag.device, self._dtype
        queries = queries.to(device, dtype)
        for name in self.layers:
            if not all(all_finite(t) for t in queries.layers[name].tensors().values()):
                raise ValueError(f"The query factors of layer {name!r} contain NaN or inf.")
        out: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for a, g in self._batches(x, y):
            for name in self.layers:
                out[name].append(_layer_scores(queries.layers[name], a[name], g[name]))
        return OrderedDict((n, torch.cat(p, dim=1)) for n, p in out.items())

    def self_scores(self, x: torch.Tensor, y: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """⟨(EK-FAC + λ)⁻¹Dᵢ, Dᵢ⟩ by layer, (N,)."""
        out: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for a, g in self._batches(x, y):
            for name in self.layers:
                f = self.factors[name]
                kfe = torch.einsum("bgto,bgti->bgoi", g[name] @ f.evecs_g, a[name] @ f.evecs_a)
                damped = f.diag + (self.regularization[name] or 0.0)
                out[name].append((kfe**2 / damped).sum(dim=(1, 2, 3)))
        return OrderedDict((n, torch.cat(p)) for n, p in out.items())

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(self.factors.values())).diag.dtype


def _layer_scores(query: LayerQuery, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Scores (n, B) of one layer's queries against a batch's rows a (B, G, T, in) and
    g (B, G, T, out)."""
    if query.dense is not None:
        return query.dense.flatten(1) @ _example_gradients(a, g).flatten(1).T
    left, right = query.left, query.right
    assert left is not None and right is not None
    if low_rank_route(left, right, a) == "expand":
        grads = _example_gradients(a, g).flatten(1)
        step = max(1, MAX_CHUNK_ELEMENTS // max(1, grads.shape[1]))
        return torch.cat(
            [
                (left[s : s + step] @ right[s : s + step]).flatten(1) @ grads.T
                for s in range(0, left.shape[0], step)
            ]
        )
    n, groups, _, rank = left.shape
    b, _, t, _ = a.shape
    g_cols = g.permute(1, 3, 0, 2).reshape(groups, g.shape[-1], b * t)  # (G, out, B·T)
    a_cols = a.permute(1, 3, 0, 2).reshape(groups, a.shape[-1], b * t)  # (G, in, B·T)
    step = max(1, MAX_CHUNK_ELEMENTS // max(1, groups * rank * b * t))
    parts = []
    for start in range(0, n, step):
        lt = left[start : start + step].permute(1, 0, 3, 2)  # (G, n', r, out)
        rt = right[start : start + step].transpose(0, 1)  # (G, n', r, in)
        k = lt.shape[1]
        lg = lt.reshape(groups, k * rank, -1) @ g_cols  # (G, n'·r, B·T)
        ra = rt.reshape(groups, k * rank, -1) @ a_cols
        parts.append((lg * ra).reshape(groups, k, rank, b, t).sum(dim=(0, 2, 4)))
    return torch.cat(parts)


def _example_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Dⱼ = Σ_t g_t ã_tᵀ of one layer for a batch: (B, G, out, in)."""
    return torch.einsum("bgto,bgti->bgoi", g, a)


#: How low-rank queries are contracted: "auto" (the cheaper in multiply-adds), "factors"
#: (Σ_t (Lᵀg_t)·(Rã_t)) or "expand" (LR of a block of test rows against Dⱼ).
LOW_RANK_ROUTE = "auto"


def low_rank_route(left: torch.Tensor, right: torch.Tensor, a: torch.Tensor) -> str:
    """The contraction order of low-rank queries against a batch, as Kronfluence's einsum
    path choice: Σ_t (Lᵀg_t)·(Rã_t) costs n·B·T·r·(out + in); expanding LR block by block
    and contracting with the batch's Dⱼ costs n·out·in·r + B·T·out·in + n·B·out·in. With
    one position per example (classifiers) the factors win; with long sequences the
    expansion does. Nothing expanded is kept: the stored factors stay compressed."""
    if LOW_RANK_ROUTE != "auto":
        return LOW_RANK_ROUTE
    n, _, out, rank = left.shape
    inp = right.shape[-1]
    b, t = a.shape[0], a.shape[2]
    factors = n * b * t * rank * (out + inp)
    expand = n * out * inp * rank + b * t * out * inp + n * b * out * inp
    return "factors" if factors <= expand else "expand"
