"""Small markdown renderings of DataFrames for Dagster metadata (no extra dependency)."""

from __future__ import annotations

import math

import pandas as pd


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def frame_to_markdown(frame: pd.DataFrame, max_rows: int = 10) -> str:
    """A GitHub-style markdown table of the first ``max_rows`` rows."""
    head = frame.head(max_rows)
    columns = [str(c) for c in head.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in head.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    if len(frame) > max_rows:
        lines.append(f"\n… {len(frame) - max_rows} more rows")
    return "\n".join(lines)
