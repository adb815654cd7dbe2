"""Our side of the engine benchmark: one method of ``influence_pipeline.influence`` in a
fresh process (``.venv/bin/python benchmarks/engine_side.py --case-dir ... --run-dir ...``).

1. Measures fit / factors / scoring time and peak memory with ``bench_common.measure``,
   exactly like ``pydvl_side.py`` does for pyDVL.
2. Records, while it runs, every curvature product the engine performs, by wrapping (in
   this process only) ``HessianOperator.batch_prod_sum`` / ``GaussNewtonOperator
   .batch_prod_sum`` (one batch times K vectors), ``CurvatureOperator._apply_to_mat``
   (whole applications: one per CG iteration) and ``InverseHarmonicMeanOperator
   ._apply_to_mat``; reads ``last_iterations`` of CG and LiSSA operators afterwards.
3. After the peak memory is read: the relative residual ‖(A + λI) f − g‖ / ‖g‖ of the
   factors (Hessian methods; a diagnostic, not timed), then the replay of exactly the
   logged products and the method's other unavoidable work with plain torch.func
   (``compute_bound.py``), timed: the bound.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from typing import Any

import torch
from bench_common import LOSS_METHODS, Case, constructor_kwargs, measure, run_worker
from compute_bound import PlainTorchFunc, ProductLog, hvp_check, method_bound

import influence_pipeline.influence as engine
from influence_pipeline.influence import curvature, ihm


def _install_product_log(log: ProductLog) -> None:
    """Wrap the engine's product entry points so that each call is appended to ``log``."""

    def wrap_batch(cls: Any, kind: str) -> None:
        original = cls.batch_prod_sum

        @functools.wraps(original)
        def batch_prod_sum(self: Any, batch: Any, mat: torch.Tensor) -> torch.Tensor:
            entry = {"phase": log.phase, "kind": kind, "batch": len(batch), "vectors": mat.shape[0]}
            log.products.append(entry)
            return original(self, batch, mat)

        cls.batch_prod_sum = batch_prod_sum

    def wrap_application(cls: Any, kind: str) -> None:
        original = cls._apply_to_mat

        @functools.wraps(original)
        def apply_to_mat(self: Any, mat: torch.Tensor) -> torch.Tensor:
            log.applications.append({"phase": log.phase, "kind": kind, "vectors": mat.shape[0]})
            return original(self, mat)

        cls._apply_to_mat = apply_to_mat

    wrap_batch(curvature.HessianOperator, "hvp")
    wrap_batch(curvature.GaussNewtonOperator, "gn")
    wrap_application(curvature.CurvatureOperator, "apply")
    wrap_application(ihm.InverseHarmonicMeanOperator, "ihm")


def _summary(log: ProductLog) -> dict[str, Any]:
    calls: Counter[str] = Counter()
    vectors: Counter[str] = Counter()
    sample_vectors: Counter[str] = Counter()
    for e in log.products:
        calls[e["phase"]] += 1
        vectors[e["phase"]] += e["vectors"]
        sample_vectors[e["phase"]] += e["vectors"] * e["batch"]
    apps: Counter[str] = Counter(f"{a['phase']}:{a['kind']}" for a in log.applications)
    app_vectors: Counter[str] = Counter()
    for a in log.applications:
        app_vectors[f"{a['phase']}:{a['kind']}"] += a["vectors"]
    return {
        "batch_calls": dict(calls),
        "vectors": dict(vectors),
        "sample_vectors": dict(sample_vectors),
        "applications": dict(apps),
        "application_vectors": dict(app_vectors),
    }


def _iterations(influence: Any) -> dict[str, int]:
    """``last_iterations`` of every CG / LiSSA block operator (iterations of the last call)."""
    out: dict[str, int] = {}
    mapper = getattr(influence, "block_mapper", None)
    if mapper is None:
        return out
    for name, composition in mapper.items():
        op = composition.op
        if isinstance(op, engine.CgOperator | engine.LissaOperator):
            out[name] = int(op.last_iterations)
    return out


def _relative_residuals(
    case: Case, spec: dict[str, Any], loss: Any, factors: torch.Tensor
) -> dict[str, float]:
    """‖(A + λI) f − g‖ / ‖g‖ for the factors f of the test gradients g, A the Hessian of
    the mean training loss (the engine's own product): how far each method's factors are
    from the exact solve that Direct computes."""
    n = factors.shape[0]
    batch = engine.TorchBatch(case.x_test[:n], case.y_test[:n])
    g = engine.TorchGradientProvider(case.model, loss).flat_grads(batch)
    lam = float(spec["kwargs"].get("regularization") or 0.0)
    if spec["cls"] == "LissaInfluence":  # LiSSA's fixed point has the damping added
        lam += float(spec["kwargs"].get("dampen", 0.0)) * float(spec["kwargs"].get("scale", 10))
    hessian = engine.HessianOperator(case.model, loss, case.loader)
    residual = torch.linalg.vector_norm(hessian.apply(factors) + lam * factors - g, dim=1)
    relative = (residual / torch.linalg.vector_norm(g, dim=1)).cpu()
    return {"median": float(relative.median()), "max": float(relative.max())}


def work(case: Case, spec: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    warnings.filterwarnings("ignore")
    log = ProductLog()
    _install_product_log(log)
    cls = getattr(engine, spec["cls"])
    kwargs = constructor_kwargs(spec, case, spec.get("ours_kwargs", {}))

    def build(model: torch.nn.Module) -> Any:
        return cls(model=model, **kwargs)

    def on_phase(name: str) -> None:
        log.phase = name

    result, scores = measure(case, spec, build, on_phase)
    influence = result["influence"]
    result["products"] = _summary(log)
    result["iterations"] = _iterations(influence)

    # Diagnostics and the bound: after the memory was read, with the engine released.
    del influence, result["influence"]
    factors = result.pop("factors")
    if spec["cls"] in LOSS_METHODS - {"InverseHarmonicMeanInfluence"}:
        result["relative_residual"] = _relative_residuals(case, spec, kwargs["loss"], factors)
    plain = PlainTorchFunc(
        case.model, case.x_train, case.y_train, int(case.config["batch_size"]), case.device
    )
    n_test = result["n_test"]
    try:
        result["bound"] = method_bound(
            plain, spec["cls"], spec["kwargs"], log, case.x_test[:n_test], case.y_test[:n_test]
        )
        if spec["cls"] in LOSS_METHODS:
            operator = engine.HessianOperator(case.model, kwargs["loss"], case.loader)
            result["bound_hvp_check"] = hvp_check(plain, operator.apply)
    except Exception as exc:  # the engine's numbers stand without a bound
        result["bound_error"] = f"{type(exc).__name__}: {exc}"
    return result, scores


if __name__ == "__main__":
    run_worker("Engine side of the engine benchmark", "ours", work)
