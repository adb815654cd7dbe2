"""PNG plots for Dagster metadata (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pandas as pd


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _figure().close(fig)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Inline markdown image (a data URI) that the Dagster UI renders."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def score_histogram(scores: np.ndarray, title: str) -> bytes:
    """Histogram of influence scores (log-scaled counts), with the helpful/harmful sides."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    values = scores[np.isfinite(scores)]
    ax.hist(values, bins=120, color="#4c72b0", log=True)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("influence score  (< 0 harmful, > 0 helpful)")
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    return png_bytes(fig)


def audit_plot(audit: pd.DataFrame, images: np.ndarray | None, top: int = 12) -> bytes:
    """Left: self-influence against training loss, flagged examples highlighted.
    Right: the top flagged examples (as 8x8-style images when the inputs are square)."""
    plt = _figure()
    flagged = audit[audit.flagged]
    show_images = images is not None and len(flagged) > 0
    fig = plt.figure(figsize=(11, 4.2))
    ax = fig.add_subplot(1, 2 if show_images else 1, 1)
    ax.scatter(audit.loss, audit.self_influence, s=6, c="#999999", label="training examples")
    ax.scatter(flagged.loss, flagged.self_influence, s=14, c="#d62728", label="flagged")
    if "known_mislabeled" in audit and audit.known_mislabeled.any():
        known = audit[audit.known_mislabeled]
        ax.scatter(
            known.loss,
            known.self_influence,
            s=40,
            facecolors="none",
            edgecolors="black",
            label="known mislabeled",
        )
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("training loss")
    ax.set_ylabel("self-influence")
    ax.legend(loc="lower right", fontsize=8)
    if show_images:
        assert images is not None
        chosen = flagged.head(top)
        side = round(float(np.sqrt(images.shape[1])))
        cols = 6
        rows = int(np.ceil(len(chosen) / cols))
        for i, (_, row) in enumerate(chosen.iterrows()):
            sub = fig.add_subplot(rows, cols * 2, (i // cols) * cols * 2 + cols + (i % cols) + 1)
            sub.imshow(images[int(row.position)].reshape(side, side), cmap="gray_r")
            label = f"y={row.label}" if "label" in row and pd.notna(row.label) else ""
            sub.set_title(f"#{row.train_id} {label}", fontsize=7)
            sub.axis("off")
    return png_bytes(fig)
