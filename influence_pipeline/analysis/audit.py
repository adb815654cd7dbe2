"""The data audit: flag training examples, explain why, and say what changed.

Input: one row per training example with its self-influence ⟨A⁻¹gᵢ, gᵢ⟩, its training
loss, and its mean influence on each test set (from the per-example score statistics).
Flags use Tukey's far-out fences (``fence`` × IQR beyond the quartiles; 3 by default), which
do not assume a distribution and are not moved much by the outliers themselves:

* ``high_self_influence``: self-influence above Q3 + fence·IQR — the model needs this example
  badly to fit it (typical of mislabeled or atypical examples);
* ``high_loss``: training loss above Q3 + fence·IQR — the model disagrees with the label;
* ``harmful``: mean influence over the test sets below Q1 − fence·IQR — up-weighting the
  example raises the test loss;
* ``likely_mislabeled``: high self-influence and high loss together.

``suspicion`` ranks examples by self-influence (1 = most suspicious); the top flagged
examples are the flagged ones in that order. :func:`compare_audits` lists what changed
against the previous audit (newly flagged, no longer flagged, newly audited examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

FLAGS = ("likely_mislabeled", "high_self_influence", "high_loss", "harmful")

REASONS = {
    "likely_mislabeled": "high self-influence and high loss",
    "high_self_influence": "self-influence far above the rest",
    "high_loss": "training loss far above the rest",
    "harmful": "lowers performance on the test sets",
}


def upper_fence(values: np.ndarray, fence: float) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + fence * (q3 - q1))


def lower_fence(values: np.ndarray, fence: float) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q1 - fence * (q3 - q1))


def audit_examples(examples: pd.DataFrame, fence: float = 3.0) -> pd.DataFrame:
    """Add flags, reasons and a suspicion rank to ``examples`` (columns ``train_id``,
    ``self_influence``, ``loss``, ``mean_influence``), sorted by suspicion."""
    required = {"train_id", "self_influence", "loss", "mean_influence"}
    missing = required - set(examples.columns)
    if missing:
        raise ValueError(f"The audit needs columns {sorted(missing)}.")
    if len(examples) < 4:
        raise ValueError(f"The audit needs at least 4 training examples, got {len(examples)}.")
    audit = examples.copy()
    self_influence = audit.self_influence.to_numpy(dtype=np.float64)
    loss = audit.loss.to_numpy(dtype=np.float64)
    mean_influence = audit.mean_influence.to_numpy(dtype=np.float64)
    audit["high_self_influence"] = self_influence > upper_fence(self_influence, fence)
    audit["high_loss"] = loss > upper_fence(loss, fence)
    audit["harmful"] = mean_influence < lower_fence(mean_influence, fence)
    audit["likely_mislabeled"] = audit.high_self_influence & audit.high_loss
    audit["flagged"] = audit[list(FLAGS)].any(axis=1)
    audit["reasons"] = [_reasons(row) for _, row in audit[list(FLAGS)].iterrows()]
    audit = audit.sort_values("self_influence", ascending=False, kind="stable").reset_index(
        drop=True
    )
    audit["suspicion"] = np.arange(1, len(audit) + 1)
    return audit


def _reasons(row: pd.Series) -> str:
    """The flags of one example in words; likely_mislabeled subsumes its two parts."""
    flags = [f for f in FLAGS if row[f]]
    if "likely_mislabeled" in flags:
        flags = [f for f in flags if f not in ("high_self_influence", "high_loss")]
    return "; ".join(REASONS[f] for f in flags)


@dataclass(frozen=True)
class AuditChanges:
    newly_flagged: list[int]
    no_longer_flagged: list[int]
    newly_audited: list[int]
    no_longer_present: list[int]
    first_audit: bool

    def to_json(self) -> dict[str, object]:
        return {
            "first_audit": self.first_audit,
            "newly_flagged": self.newly_flagged,
            "no_longer_flagged": self.no_longer_flagged,
            "newly_audited": len(self.newly_audited),
            "no_longer_present": len(self.no_longer_present),
        }


def compare_audits(previous: pd.DataFrame | None, current: pd.DataFrame) -> AuditChanges:
    """What changed since the previous audit (by training id)."""
    now_ids = set(current.train_id.tolist())
    now_flagged = set(current.train_id[current.flagged].tolist())
    if previous is None:
        return AuditChanges(sorted(now_flagged), [], sorted(now_ids), [], True)
    before_ids = set(previous.train_id.tolist())
    before_flagged = set(previous.train_id[previous.flagged].tolist())
    return AuditChanges(
        newly_flagged=sorted(now_flagged - before_flagged),
        no_longer_flagged=sorted(before_flagged - now_flagged),
        newly_audited=sorted(now_ids - before_ids),
        no_longer_present=sorted(before_ids - now_ids),
        first_audit=False,
    )


def known_mislabeled_found(audit: pd.DataFrame, known: set[int]) -> dict[str, int]:
    """How many known mislabeled examples the audit finds: among the top-|known| flagged
    examples by suspicion, and among the likely_mislabeled flags."""
    flagged = audit[audit.flagged]
    top = set(flagged.train_id.head(len(known)).tolist())
    likely = set(audit.train_id[audit.likely_mislabeled].tolist())
    return {
        "known": len(known),
        "found_in_top": len(top & known),
        "top": min(len(known), len(flagged)),
        "likely_mislabeled": len(likely),
        "known_among_likely_mislabeled": len(likely & known),
    }
