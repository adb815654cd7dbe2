"""The tables of the store, one schema each: column names, pandas dtypes and descriptions.

The same thing has the same name in every table: a test point is ``test_id`` (its id) and
``test_position`` (its row in the factors and the scores, 0-based) with ``test_label``; a
training example is ``train_id``, ``train_shard``, ``train_row`` (its row within the
shard) and ``train_label``. Labels are nullable integers (``Int64``), NA where the targets
are not class labels. A stored table's name says its kind: ``<test_set>/top_k``,
``<test_set>/train_totals``, ``audit/latest`` and ``audit/history-<stamp>``.
:data:`TABLES` is the registry (the Dagster layer turns a schema's columns into
``dg.TableSchema`` column descriptions); :meth:`TableSchema.check` validates a frame.
The audit table's columns are defined with the audit (``influence_pipeline.analysis.audit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import StoreError


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # pandas dtype name, as str(series.dtype) spells it
    description: str


@dataclass(frozen=True)
class TableSchema:
    kind: str
    names: str  # how stored tables of this kind are named
    description: str
    columns: tuple[Column, ...]  # empty: defined elsewhere (the audit)

    def dtypes(self) -> dict[str, str]:
        return {c.name: c.dtype for c in self.columns}

    def check(self, frame: Any) -> None:
        """Raise :class:`StoreError` naming every column of ``frame`` that is missing,
        unexpected or of another dtype than the schema says."""
        if not self.columns:
            return
        wanted = self.dtypes()
        got = {str(c): str(t) for c, t in frame.dtypes.items()}
        problems = [f"missing column {c!r} ({t})" for c, t in wanted.items() if c not in got]
        problems += [f"unexpected column {c!r}" for c in got if c not in wanted]
        problems += [
            f"column {c!r} is {got[c]}, expected {t}"
            for c, t in wanted.items()
            if c in got and got[c] != t
        ]
        if list(got) != [c for c in wanted if c in got] and not problems:
            problems.append(f"columns are in the order {list(got)}, expected {list(wanted)}")
        if problems:
            raise StoreError(
                f"The {self.kind} table does not match its schema: " + "; ".join(problems) + "."
            )


_TEST = (
    Column("test_id", "int64", "id of the test point"),
    Column("test_position", "int64", "row of the test point in the factors and scores (0-based)"),
    Column("test_label", "Int64", "class label of the test point (NA if not a class label)"),
)

TOP_K = TableSchema(
    kind="top_k",
    names="<test_set>/top_k",
    description="Per test point, the k most helpful (largest scores) and k most harmful "
    "(smallest scores) training examples, merged from the per-shard top-k lists.",
    columns=(
        *_TEST,
        Column("kind", "category", "'helpful' (score > 0 lowers the test loss) or 'harmful'"),
        Column("rank", "int64", "1 = the strongest of its kind for this test point"),
        Column("train_id", "int64", "id of the training example"),
        Column("train_shard", "category", "training shard holding the example"),
        Column("train_row", "int64", "row of the example within its shard (0-based)"),
        Column("train_label", "Int64", "class label of the training example (NA if none)"),
        Column("score", "float32", "influence ⟨A⁻¹∇ℓ(z_test), ∇ℓ(z_train)⟩"),
    ),
)

TRAIN_TOTALS = TableSchema(
    kind="train_totals",
    names="<test_set>/train_totals",
    description="Per training example, its scores summed, averaged and extremes over the "
    "test points of the test set, most harmful overall (lowest score_sum) first.",
    columns=(
        Column("train_id", "int64", "id of the training example"),
        Column("train_shard", "category", "training shard holding the example"),
        Column("train_row", "int64", "row of the example within its shard (0-based)"),
        Column("train_label", "Int64", "class label of the training example (NA if none)"),
        Column("score_sum", "float64", "sum of its scores over the test points"),
        Column("score_mean", "float64", "mean of its scores over the test points"),
        Column("score_min", "float32", "smallest of its scores (most harmful to one test point)"),
        Column("score_max", "float32", "largest of its scores (most helpful to one test point)"),
    ),
)

AUDIT = TableSchema(
    kind="audit",
    names="audit/latest, audit/history-<stamp>",
    description="The data audit: per training example, its flags and the reasons "
    "(columns: see influence_pipeline.analysis.audit).",
    columns=(),
)

#: Every table kind the store knows.
TABLES: dict[str, TableSchema] = {s.kind: s for s in (TOP_K, TRAIN_TOTALS, AUDIT)}


def table_kind(name: str) -> str:
    """The kind of the stored table ``name``; :class:`StoreError` naming the known
    tables for any other name."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) == 2:
        if parts[0] == "audit" and (parts[1] == "latest" or parts[1].startswith("history-")):
            return "audit"
        if parts[1] in ("top_k", "train_totals"):
            return parts[1]
    raise StoreError(
        f"Unknown table {name!r}: the tables are "
        + ", ".join(repr(s.names) for s in TABLES.values())
        + "."
    )


def schema_of(name: str) -> TableSchema:
    """The schema of the stored table ``name`` (see :func:`table_kind`)."""
    return TABLES[table_kind(name)]
