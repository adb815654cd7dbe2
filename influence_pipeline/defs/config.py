"""Run configuration the Launchpad shows; defaults come from the workload."""

import json
from typing import Any

import dagster as dg
from pydantic import Field

from ..workload import METHODS, MethodSpec


def method_config_class(defaults: MethodSpec) -> type[dg.Config]:
    """A Config class for the influence method whose defaults are ``defaults``."""

    class MethodConfig(dg.Config):
        """The influence method that fits the block mapper."""

        method: str = Field(default=defaults.method, description=f"one of {sorted(METHODS)}")
        regularization: float | None = Field(
            default=defaults.regularization, description="λ added to each block's curvature"
        )
        rank: int = Field(default=defaults.rank, description="rank of Arnoldi / Nyström")
        block_structure: str = Field(
            default=defaults.block_structure, description="full, layer_wise or parameter_wise"
        )
        second_order_mode: str = Field(
            default=defaults.second_order_mode, description="hessian or gauss_newton"
        )
        options_json: str = Field(
            default=json.dumps(dict(defaults.options), sort_keys=True),
            description='further constructor arguments as JSON, e.g. {"rtol": 1e-6}',
        )
        device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda")

        def spec(self) -> MethodSpec:
            options: dict[str, Any] = json.loads(self.options_json or "{}")
            return MethodSpec(
                method=self.method,
                regularization=self.regularization,
                rank=self.rank,
                block_structure=self.block_structure,
                second_order_mode=self.second_order_mode,
                options=options,
            )

    return MethodConfig


class FactorsConfig(dg.Config):
    """How influence factors are computed and stored."""

    batch_size: int = Field(default=64, description="test points per batch")
    dtype: str = Field(default="float32", description="float32 or float64 in the store")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda")


class ScoringConfig(dg.Config):
    """How a training shard is scored against the factors."""

    batch_size: int = Field(default=256, description="training examples per batch")
    top_k: int = Field(default=20, description="helpful and harmful examples kept per test point")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda")
    spot_checks: int = Field(default=3, description="scores recomputed by the spot-check")


class TableConfig(dg.Config):
    top_k: int = Field(default=10, description="helpful and harmful examples per test point")


class AuditConfig(dg.Config):
    fence: float = Field(default=3.0, description="Tukey fence multiplier (IQR) for the flags")
    batch_size: int = Field(default=256, description="training examples per batch")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda")
