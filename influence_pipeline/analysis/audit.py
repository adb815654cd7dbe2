"""The data audit: flag training examples, explain why, and say what changed.

Input: one row per training example with its self-influence ⟨A⁻¹gᵢ, gᵢ⟩, its training
loss, and its mean influence on each test set (from the per-example score statistics);
optionally ``train_label`` and ``checkpoint_loss`` (the mean training loss over checkpoints
saved during training). Flags use Tukey's far-out fences (``fence`` × IQR beyond the
quartiles; 3 by default), which do not assume a distribution and are not moved much by the
outliers themselves:

* ``high_self_influence``: self-influence above Q3 + fence·IQR — the model needs this example
  badly to fit it (typical of mislabeled or atypical examples);
* ``high_loss``: training loss above Q3 + fence·IQR — the model disagrees with the label;
* ``harmful``: mean influence over the test sets below Q1 − fence·IQR — up-weighting the
  example raises the test loss;
* ``likely_mislabeled``: both fences, and the estimated leave-one-out loss
  ``loo_loss = loss + self_influence / n_fit`` above ``loss_threshold`` (default ln 2: a
  classifier trained without the example would give its label probability below 1/2).
  Removing example i moves θ by (1/N)A⁻¹gᵢ to first order and so raises its own loss by
  (1/N)⟨A⁻¹gᵢ, gᵢ⟩. ``loss_threshold=None`` keeps the fences alone (for losses that are not
  a negative log-likelihood of a class). Measured on the bundled digits workload (3 % flips,
  seeds 0/1/2 of the split): precision 0.83/0.79/0.79 at recall 1.00/0.97/0.95; the fences
  alone flag about twice the flips (precision 0.46/0.45/0.42).

``suspicion`` ranks examples (1 = most suspicious) by ``checkpoint_loss`` where the workload
provides it, else by ``loo_loss``. Measured (``benchmarks/quality_benchmark.py mislabel``,
seeds 0/1/2, mean ± std) on the memorizing digits workload (10 % flips, no weight decay,
every flip fitted), the fraction of flips in the top 10 %: checkpoint loss 0.95 ± 0.01 (AP
0.99), the mean leave-one-out loss over checkpoints 0.95 ± 0.01, checkpoint self-influence
alone 0.86 ± 0.03; at the final checkpoint only, every ranking is near 0.70 (loss
0.70 ± 0.02, loo_loss 0.70 ± 0.02, self-influence of Direct 0.71 ± 0.02, EK-FAC 0.69,
Arnoldi and IHM 0.66) and random 0.12. On the bundled workload all of them put every flip in
the top 5 % (AP 0.98-0.99). ``loo_loss`` is the final-checkpoint choice because it is what
``likely_mislabeled`` thresholds, and no single-checkpoint ranking is measurably better.

:func:`compare_audits` lists what changed against the previous audit, for any flag or all
of them: newly flagged, no longer flagged, still flagged, newly audited examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

FLAGS = ("likely_mislabeled", "high_self_influence", "high_loss", "harmful")

REASONS = {
    "likely_mislabeled": "high self-influence and high loss, label unlikely without it",
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


#: The default ``loss_threshold``: ln 2, a class probability of 1/2.
LN2 = float(np.log(2.0))


def audit_examples(
    examples: pd.DataFrame,
    fence: float = 3.0,
    n_fit: int | None = None,
    loss_threshold: float | None = LN2,
) -> pd.DataFrame:
    """Add flags, reasons, ``loo_loss`` and a suspicion rank to ``examples`` (columns
    ``train_id``, ``self_influence``, ``loss``, ``mean_influence``; optionally
    ``train_label`` (``label`` is renamed to it) and ``checkpoint_loss``), sorted by
    suspicion. ``n_fit`` is the number of examples the curvature was fitted on (default: the
    number of rows)."""
    required = {"train_id", "self_influence", "loss", "mean_influence"}
    missing = required - set(examples.columns)
    if missing:
        raise ValueError(
            f"The audit needs columns {sorted(missing)}; examples has {sorted(examples.columns)}."
        )
    if len(examples) < 4:
        raise ValueError(f"The audit needs at least 4 training examples, got {len(examples)}.")
    n_fit = len(examples) if n_fit is None else n_fit
    if n_fit < 1:
        raise ValueError(f"n_fit must be a positive number of examples, got {n_fit}.")
    audit = examples.copy()
    if "label" in audit.columns and "train_label" not in audit.columns:
        audit = audit.rename(columns={"label": "train_label"})
    self_influence = audit.self_influence.to_numpy(dtype=np.float64)
    loss = audit.loss.to_numpy(dtype=np.float64)
    mean_influence = audit.mean_influence.to_numpy(dtype=np.float64)
    audit["loo_loss"] = loss + self_influence / n_fit
    audit["high_self_influence"] = self_influence > upper_fence(self_influence, fence)
    audit["high_loss"] = loss > upper_fence(loss, fence)
    audit["harmful"] = mean_influence < lower_fence(mean_influence, fence)
    likely = audit.high_self_influence & audit.high_loss
    if loss_threshold is not None:
        likely &= audit.loo_loss > loss_threshold
    audit["likely_mislabeled"] = likely
    audit["flagged"] = audit[list(FLAGS)].any(axis=1)
    audit["reasons"] = [_reasons(row) for _, row in audit[list(FLAGS)].iterrows()]
    key = ranking_column(audit)
    audit = audit.sort_values(key, ascending=False, kind="stable").reset_index(drop=True)
    audit["suspicion"] = np.arange(1, len(audit) + 1)
    return audit


def ranking_column(audit: pd.DataFrame) -> str:
    """The column the suspicion rank sorts by (descending): the mean loss over training
    checkpoints where present (complete), else the estimated leave-one-out loss."""
    if "checkpoint_loss" in audit.columns and audit.checkpoint_loss.notna().all():
        return "checkpoint_loss"
    return "loo_loss"


def _reasons(row: pd.Series) -> str:
    """The flags of one example in words; likely_mislabeled subsumes its two parts."""
    flags = [f for f in FLAGS if row[f]]
    if "likely_mislabeled" in flags:
        flags = [f for f in flags if f not in ("high_self_influence", "high_loss")]
    return "; ".join(REASONS[f] for f in flags)


@dataclass(frozen=True)
class AuditChanges:
    """Training ids by how their flags changed between two audits."""

    newly_flagged: list[int]
    no_longer_flagged: list[int]
    newly_audited: list[int]
    no_longer_present: list[int]
    first_audit: bool
    still_flagged: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "first_audit": self.first_audit,
            "newly_flagged": self.newly_flagged,
            "no_longer_flagged": self.no_longer_flagged,
            "still_flagged": len(self.still_flagged),
            "newly_audited": len(self.newly_audited),
            "no_longer_present": len(self.no_longer_present),
        }


def compare_audits(
    previous: pd.DataFrame | None, current: pd.DataFrame, flag: str = "flagged"
) -> AuditChanges:
    """What changed since the previous audit (by training id), for any flag (default: any
    flag at all); an audit that lacks the column counts as flagging nothing."""
    if flag != "flagged" and flag not in FLAGS:
        raise ValueError(f"flag must be 'flagged' or one of {list(FLAGS)}, got {flag!r}.")
    if flag not in current.columns:
        raise ValueError(f"The current audit has no column {flag!r}.")
    now_ids = set(current.train_id.tolist())
    now_flagged = set(current.train_id[current[flag]].tolist())
    if previous is None:
        return AuditChanges(sorted(now_flagged), [], sorted(now_ids), [], True, [])
    before_ids = set(previous.train_id.tolist())
    before_flagged = (
        set(previous.train_id[previous[flag]].tolist()) if flag in previous.columns else set()
    )
    return AuditChanges(
        newly_flagged=sorted(now_flagged - before_flagged),
        no_longer_flagged=sorted(before_flagged - now_flagged),
        newly_audited=sorted(now_ids - before_ids),
        no_longer_present=sorted(before_ids - now_ids),
        first_audit=False,
        still_flagged=sorted(now_flagged & before_flagged),
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
