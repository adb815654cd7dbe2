"""The audit: flags, the leave-one-out rule, the suspicion ranking and the diff between
two runs in which one training shard changed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from influence_pipeline.analysis.audit import LN2, audit_examples, compare_audits
from influence_pipeline.influence import DirectInfluence

N_PER_SHARD, DIM, CLASSES, LAM = 60, 4, 3, 1e-2


def _blobs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    centres = 8.0 * torch.eye(CLASSES, DIM, dtype=torch.float64)
    y = torch.arange(2 * N_PER_SHARD) % CLASSES
    x = centres[y] + torch.randn(2 * N_PER_SHARD, DIM, generator=generator, dtype=torch.float64)
    return x, y


def _audit(x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Fit a weight-decayed logistic regression on the two shards (Newton's method on the
    15 parameters, no torch.optim: its first use imports the compiler stack), then audit it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, CLASSES).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, theta.split([s.numel() for s in shapes]), strict=True))
        params = {n: parts[n].reshape(s) for n, s in zip(names, shapes, strict=True)}
        logits = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(logits, y) + 0.5 * LAM * (theta @ theta)

    for _ in range(30):
        gradient = torch.func.grad(objective)(flat)
        flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), gradient)
    assert torch.func.grad(objective)(flat).norm() < 1e-10
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    influence = DirectInfluence(model, torch.nn.functional.cross_entropy, LAM).fit(loader)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    examples = pd.DataFrame(
        {
            "train_id": np.arange(len(y)),
            "train_shard": np.repeat(["a", "b"], N_PER_SHARD),
            "label": y.numpy(),
            "self_influence": influence.self_influences(x, y).numpy(),
            "loss": loss.numpy(),
            "mean_influence": 0.0,
        }
    )
    return audit_examples(examples)


def test_diff_across_two_runs_with_a_changed_shard() -> None:
    x, y_clean = _blobs()
    y1 = y_clean.clone()
    y1[[3, 70]] = (y_clean[[3, 70]] + 1) % CLASSES  # one flip in each shard
    first = _audit(x, y1)
    assert set(first.train_id[first.likely_mislabeled]) == {3, 70}
    assert "train_label" in first.columns and "label" not in first.columns
    # shard b is rewritten: example 70 corrected, example 100 flipped; shard a unchanged
    y2 = y1.clone()
    y2[70] = y_clean[70]
    y2[100] = (y_clean[100] + 2) % CLASSES
    second = _audit(x, y2)
    assert set(second.train_id[second.likely_mislabeled]) == {3, 100}
    changes = compare_audits(first, second, flag="likely_mislabeled")
    assert (changes.newly_flagged, changes.no_longer_flagged) == ([100], [70])
    assert changes.still_flagged == [3]
    assert changes.to_json()["first_audit"] is False
    # any flag at all: the sets partition consistently
    every = compare_audits(first, second)
    assert set(every.newly_flagged).isdisjoint(every.still_flagged)
    assert set(every.still_flagged) | set(every.newly_flagged) == set(
        second.train_id[second.flagged]
    )
    # the flipped examples lead the suspicion ranking
    assert set(second.train_id.head(2)) == {3, 100}


def test_compare_audits_exact_lists() -> None:
    def frame(flagged: dict[int, bool]) -> pd.DataFrame:
        return pd.DataFrame({"train_id": list(flagged), "flagged": list(flagged.values())})

    before = frame({1: True, 2: True, 3: False, 4: False, 5: True})
    after = frame({1: True, 2: False, 3: True, 4: False, 6: True})
    changes = compare_audits(before, after)
    assert changes.newly_flagged == [3, 6]
    assert changes.no_longer_flagged == [2, 5]
    assert changes.still_flagged == [1]
    assert changes.newly_audited == [6]
    assert changes.no_longer_present == [5]
    first = compare_audits(None, after)
    assert first.first_audit and first.newly_flagged == [1, 3, 6] and first.still_flagged == []


def _frame(loss: np.ndarray, self_influence: np.ndarray, **extra: object) -> pd.DataFrame:
    n = len(loss)
    return pd.DataFrame(
        {
            "train_id": np.arange(n),
            "self_influence": self_influence,
            "loss": loss,
            "mean_influence": np.zeros(n),
            **extra,
        }
    )


def test_likely_mislabeled_needs_the_leave_one_out_loss_above_the_threshold() -> None:
    n = 100
    loss = np.full(n, 0.01) + np.linspace(0, 0.01, n)
    self_influence = np.full(n, 1.0) + np.linspace(0, 0.1, n)
    # two far outliers in both: loss + self_influence / n = 0.5 + 10 / 100 = 0.6 < ln 2, and
    # 0.5 + 30 / 100 = 0.8 > ln 2
    loss[[10, 20]] = 0.5
    self_influence[[10, 20]] = [10.0, 30.0]
    audit = audit_examples(_frame(loss, self_influence)).set_index("train_id")
    assert audit.loc[10, "loo_loss"] == pytest.approx(0.6)
    assert audit.loc[10, "high_loss"] and audit.loc[10, "high_self_influence"]
    assert audit.likely_mislabeled.sum() == 1 and audit.loc[20, "likely_mislabeled"]
    fences_only = audit_examples(_frame(loss, self_influence), loss_threshold=None)
    assert set(fences_only.train_id[fences_only.likely_mislabeled]) == {10, 20}
    # n_fit scales the leave-one-out term: with 10 fit examples both clear ln 2
    assert audit_examples(_frame(loss, self_influence), n_fit=10).likely_mislabeled.sum() == 2
    assert pytest.approx(np.log(2)) == LN2


def test_suspicion_uses_checkpoint_loss_where_present() -> None:
    rng = np.random.default_rng(0)
    loss, self_influence = rng.uniform(size=20), rng.uniform(size=20)
    checkpoint_loss = np.arange(20.0)
    audit = audit_examples(_frame(loss, self_influence, checkpoint_loss=checkpoint_loss))
    assert audit.train_id.tolist() == list(range(19, -1, -1))
    assert audit.suspicion.tolist() == list(range(1, 21))
    plain = audit_examples(_frame(loss, self_influence))
    order = np.argsort(-(loss + self_influence / 20), kind="stable")
    assert plain.train_id.tolist() == order.tolist()


def test_audit_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"needs columns \['loss'\]"):
        audit_examples(_frame(np.zeros(5), np.zeros(5)).drop(columns="loss"))
    with pytest.raises(ValueError, match="at least 4 training examples, got 3"):
        audit_examples(_frame(np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError, match="flag must be 'flagged' or one of"):
        compare_audits(None, _frame(np.zeros(5), np.zeros(5)), flag="nope")
    with pytest.raises(ValueError, match="n_fit must be a positive"):
        audit_examples(_frame(np.zeros(5), np.zeros(5)), n_fit=0)
