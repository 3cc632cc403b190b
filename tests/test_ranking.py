"""The report's "not worse than the best" mark uses the corrected resampled t-test on the
same folds (issue 13, item 4)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from automl_cxr.report._ranking import not_worse_than_best


def _splits(n_train: int, n_val: int, k: int, tag: str = "a") -> list[dict]:
    return [
        {"fold": i, "n_train": n_train, "n_val": n_val, "train_hash": f"{tag}t{i}",
         "val_hash": f"{tag}v{i}", "val_indices": [i]}
        for i in range(k)
    ]  # fmt: skip


def test_overlapping_folds_widen_the_paired_test() -> None:
    best = [0.90, 0.92, 0.91, 0.93, 0.90]
    other = [0.87, 0.915, 0.89, 0.93, 0.88]  # mostly a little lower
    d = np.subtract(other, best)
    plain = stats.ttest_rel(other, best, alternative="less").pvalue
    assert plain < 0.05  # the naive test calls it worse
    k, n_train, n_val = 5, 1140, 285
    t = d.mean() / np.sqrt((1 / k + n_val / n_train) * d.var(ddof=1))
    expected = stats.t.cdf(t, df=k - 1)
    marks = not_worse_than_best(
        {0: best, 1: other},
        0,
        splits={0: _splits(n_train, n_val, k), 1: _splits(n_train, n_val, k)},
    )
    assert np.isclose(marks[1]["p_value"], expected)
    # Folds that share 75 % of their training images are not independent: corrected, the
    # difference is within noise and the trial is marked as tied with the best.
    assert expected >= 0.05 and marks[1]["not_worse"] is True


def test_trials_on_other_folds_are_not_compared() -> None:
    best, other = [0.9, 0.91, 0.92], [0.8, 0.81, 0.8]
    same = not_worse_than_best(
        {0: best, 1: other}, 0, splits={0: _splits(100, 50, 3), 1: _splits(100, 50, 3)}
    )
    assert same[1]["not_worse"] is False
    # Same sizes, other members (e.g. another --seed or --cv): no test.
    differ = not_worse_than_best(
        {0: best, 1: other}, 0, splits={0: _splits(100, 50, 3), 1: _splits(100, 50, 3, tag="b")}
    )
    assert differ[1]["not_worse"] is None and differ[1]["n"] == 0
    # Extra per-fold details (epochs chosen by early stopping) do not make folds differ.
    extra = _splits(100, 50, 3)
    for s in extra:
        s["best_epoch"] = 4
    again = not_worse_than_best({0: best, 1: other}, 0, splits={0: _splits(100, 50, 3), 1: extra})
    assert again[1]["not_worse"] is False
