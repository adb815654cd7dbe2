"""Run configuration the Launchpad shows, typed and validated; defaults come from the workload.

Choices are enums, so Dagster refuses a typo when the run is launched, before it starts
(``Value at path root:ops:block_mapper:config:method not in enum type Method got ektac``;
the Launchpad offers the members). Ranges are pydantic constraints, checked when the step
builds its config (Dagster's config schema has no ranges), and by :func:`validate_run_config`,
which the CLI calls before launching anything.
"""

import enum
import json
from typing import Any

import dagster as dg
from pydantic import Field, ValidationError

from ..workload import Fisher, Method, MethodSpec


class BlockStructure(enum.Enum):
    """How parameters are grouped into blocks of a block-diagonal curvature."""

    full = "full"
    layer_wise = "layer_wise"
    parameter_wise = "parameter_wise"


class CurvatureMode(enum.Enum):
    """Which curvature to invert: the Hessian or the Gauss-Newton matrix."""

    hessian = "hessian"
    gauss_newton = "gauss_newton"


class Device(enum.Enum):
    """Where a step computes: ``auto`` is CUDA when torch sees a GPU, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class StoredDtype(enum.Enum):
    """The floating-point type of the stored factors."""

    float32 = "float32"
    float64 = "float64"


def method_config_class(defaults: MethodSpec) -> type[dg.Config]:
    """A Config class for the influence method whose defaults are ``defaults``."""

    class MethodConfig(dg.Config):
        """The influence method that fits the block mapper."""

        method: Method = Field(
            default=Method(defaults.method), description="one of " + ", ".join(Method.__members__)
        )
        regularization: float | None = Field(
            default=defaults.regularization, ge=0, description="λ ≥ 0 added to each block"
        )
        rank: int = Field(default=defaults.rank, ge=1, description="rank of Arnoldi / Nyström")
        block_structure: BlockStructure = Field(default=BlockStructure(defaults.block_structure))
        second_order_mode: CurvatureMode = Field(default=CurvatureMode(defaults.second_order_mode))
        options_json: str = Field(
            default=json.dumps(dict(defaults.options), sort_keys=True),
            description='further constructor arguments as JSON, e.g. {"rtol": 1e-6}',
        )
        fisher: Fisher = Field(
            default=Fisher(defaults.fisher),
            description="EK-FAC only: exact (per class), sampled (labels from the model), "
            "empirical (true labels)",
        )
        fisher_samples: int = Field(
            default=defaults.fisher_samples, ge=1, description="EK-FAC sampled: labels per example"
        )
        query_rank: int | None = Field(
            default=defaults.query_rank,
            ge=1,
            description="EK-FAC only: empty = dense (n_test, P) factors; r ≥ 1 = per-layer "
            "rank-r query factors",
        )
        modules: list[str] | None = Field(
            default=None if defaults.modules is None else list(defaults.modules),
            description="EK-FAC only: layer names to factor (empty: every supported layer)",
        )
        device: Device = Field(default=Device.auto, description="auto: CUDA when present")

        def spec(self) -> MethodSpec:
            try:
                options: dict[str, Any] = json.loads(self.options_json or "{}")
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"options_json is not JSON ({error}): {self.options_json!r}"
                ) from error
            if not isinstance(options, dict):
                raise ValueError(f"options_json must be a JSON object, got {self.options_json!r}")
            return MethodSpec(
                method=self.method.value,
                regularization=self.regularization,
                rank=self.rank,
                block_structure=self.block_structure.value,
                second_order_mode=self.second_order_mode.value,
                options=options,
                fisher=self.fisher.value,
                fisher_samples=self.fisher_samples,
                query_rank=self.query_rank,
                modules=self.modules,
            )

    return MethodConfig


class FactorsConfig(dg.Config):
    """How influence factors are computed and stored."""

    batch_size: int = Field(default=64, ge=1, description="test points per batch")
    dtype: StoredDtype = Field(default=StoredDtype.float32, description="dtype in the store")
    device: Device = Field(default=Device.auto, description="auto: CUDA when present")


class ScoringConfig(dg.Config):
    """How a training shard is scored against the factors."""

    batch_size: int = Field(default=256, ge=1, description="training examples per batch")
    top_k: int = Field(
        default=20, ge=1, description="helpful and harmful examples kept per test point"
    )
    device: Device = Field(default=Device.auto, description="auto: CUDA when present")
    spot_checks: int = Field(
        default=3, ge=0, le=3, description="scores recomputed by the spot-check"
    )


class TableConfig(dg.Config):
    top_k: int = Field(default=10, ge=1, description="helpful and harmful examples per test point")


class AuditConfig(dg.Config):
    fence: float = Field(default=3.0, gt=0, description="Tukey fence multiplier (IQR)")
    batch_size: int = Field(default=256, ge=1, description="training examples per batch")
    device: Device = Field(default=Device.auto, description="auto: CUDA when present")


def config_classes(defaults: MethodSpec) -> dict[str, type[dg.Config]]:
    """op (asset) name → its config class."""
    return {
        "block_mapper": method_config_class(defaults),
        "influence_factors": FactorsConfig,
        "influence_scores": ScoringConfig,
        "influence_table": TableConfig,
        "data_audit": AuditConfig,
    }


def validate_run_config(
    defs: dg.Definitions, job_name: str, run_config: dict[str, Any], defaults: MethodSpec
) -> None:
    """Refuse ``run_config`` for ``job_name`` before anything runs: choices (Dagster's config
    schema) and ranges (each op's config class), one line naming every problem."""
    problems: list[str] = []
    try:
        dg.validate_run_config(defs.resolve_job_def(job_name), run_config)
    except dg.DagsterInvalidConfigError as error:
        # enum values are reported below with their choices
        problems += [e.message for e in error.errors if "not in enum type" not in e.message]
    classes = config_classes(defaults)
    for op_name, op_config in (run_config.get("ops") or {}).items():
        if op_name not in classes or not isinstance(op_config, dict):
            continue
        values = op_config.get("config") or {}
        for name, info in classes[op_name].model_fields.items():
            kind = info.annotation
            if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
                continue
            if name in values and values[name] not in kind.__members__:
                problems.append(
                    f"{op_name}.{name}={values[name]!r} is not one of "
                    + ", ".join(kind.__members__)
                )
        try:
            classes[op_name](**values)
        except ValidationError as error:
            problems += [
                f"{op_name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} "
                f"(got {e.get('input')!r})"
                for e in error.errors()
                if e["type"] != "enum"  # choices: already reported by Dagster above
            ]
    if problems:
        raise ValueError("Invalid run config: " + "; ".join(problems))
