"""pyDVL 0.10 worker of the engine benchmark: run ONLY with the pyDVL interpreter
(``/work/pydvl-venv/bin/python benchmarks/pydvl_side.py --case-dir ... --run-dir ...``).

It measures one method of ``pydvl.influence.torch`` exactly as ``engine_side.py`` measures
ours (same case files, same model construction, same constructor arguments, same timing
code in ``bench_common.measure``) and additionally counts the curvature products pyDVL
performs: every call of ``HessianBatchOperation.apply`` / ``InverseHarmonicMeanBatchOperation
.apply`` (one batch times K vectors) is logged by wrapping the method in this process.
pyDVL's DirectInfluence forms the Hessian with ``torch.func.hessian`` per batch, which
this wrapper does not see.

pyDVL is never imported by the project; this file is not part of the package.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from typing import Any

import torch
from bench_common import Case, constructor_kwargs, measure, run_worker


def _install_product_log(log: list[dict[str, Any]], phase: list[str]) -> None:
    """Wrap pyDVL's batch operations so that each call records (phase, batch size, K)."""
    from pydvl.influence.torch import batch_operation

    for cls_name, kind in (
        ("HessianBatchOperation", "hvp"),
        ("InverseHarmonicMeanBatchOperation", "ihm"),
        ("GaussNewtonBatchOperation", "gn"),
    ):
        cls = getattr(batch_operation, cls_name)
        original = cls.apply

        @functools.wraps(original)
        def apply(self: Any, batch: Any, tensor: torch.Tensor, _o=original, _k=kind) -> Any:
            k = int(tensor.shape[0]) if tensor.ndim == 2 else 1
            log.append({"phase": phase[0], "kind": _k, "batch": len(batch.x), "vectors": k})
            return _o(self, batch, tensor)

        cls.apply = apply


def _summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    calls: Counter[str] = Counter()
    vectors: Counter[str] = Counter()
    sample_vectors: Counter[str] = Counter()
    for entry in log:
        calls[entry["phase"]] += 1
        vectors[entry["phase"]] += entry["vectors"]
        sample_vectors[entry["phase"]] += entry["vectors"] * entry["batch"]
    return {
        "batch_calls": dict(calls),
        "vectors": dict(vectors),
        "sample_vectors": dict(sample_vectors),
    }


def work(case: Case, spec: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    import pydvl.influence.torch as pydvl_torch

    warnings.filterwarnings("ignore")
    log: list[dict[str, Any]] = []
    phase = ["setup"]
    _install_product_log(log, phase)
    cls = getattr(pydvl_torch, spec["cls"])
    kwargs = constructor_kwargs(spec, case, spec.get("pydvl_kwargs", {}))

    def build(model: torch.nn.Module) -> Any:
        return cls(model=model, **kwargs)

    def on_phase(name: str) -> None:
        phase[0] = name

    result, scores = measure(case, spec, build, on_phase)
    result["products"] = _summary(log)
    return result, scores


if __name__ == "__main__":
    run_worker("pyDVL 0.10 side of the engine benchmark", "pydvl", work)
