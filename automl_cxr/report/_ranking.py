"""Ranking the COMPLETE trials: the leaderboard, "not significantly worse than the best", the
best trial per group, and two studies side by side.

Conventions
-----------
* Only COMPLETE trials with a finite score are ranked.
* Ties on the score are broken by cost: lower latency, then fewer parameters, then the earlier
  trial.
* "Not significantly worse than the best" (:func:`not_worse_than_best`): a one-sided paired
  test of the trial's fold scores against the best trial's on the same folds — the corrected
  resampled t-test of Nadeau & Bengio (2003) (:func:`automl_cxr.engine.corrected_paired_ttest`,
  ``alternative="less"``), whose variance term ``1/K + n_val/n_train`` accounts for the
  overlapping training sets of K-fold CV (the plain paired t-test treats the folds as
  independent and so marks too few trials as tied); the trial is marked when ``p >= alpha``.
  No multiple-comparison correction is applied. Two trials are compared only when they used
  the same folds (the same recorded fold members, by hash); otherwise, or with fewer than two
  paired folds, the mark is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from automl_cxr.engine import corrected_paired_ttest
from automl_cxr.errors import ConfigError
from automl_cxr.study import fold_members, json_safe

__all__ = [
    "DEFAULT_ALPHA",
    "best_per_group",
    "compare_best_per_backbone",
    "leaderboard",
    "not_worse_than_best",
]

DEFAULT_ALPHA = 0.05
_NAN = float("nan")


def not_worse_than_best(
    folds: Mapping[int, Sequence[float]],
    best: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    splits: Mapping[int, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """Which trials are not significantly worse than `best` on the same folds.

    Args:
        folds: per trial, its per-fold scores (same fold order for every trial).
        best: the key of the best trial in `folds`.
        alpha: the test level.
        splits: per trial, a description of its folds (e.g. the recorded ``splits``); trials
            whose folds differ from the best trial's are not tested.

    Returns:
        per trial ``{"p_value", "mean_diff", "n", "not_worse"}``: ``not_worse`` is True when
        the one-sided corrected paired t-test (H1: trial < best) gives ``p >= alpha``, False when
        ``p < alpha``, and None when it cannot be run (fewer than two paired folds, or other
        folds). The best trial itself is True with ``p_value = 1``.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), but got alpha={alpha}")
    if best not in folds:
        raise ConfigError(f"best trial {best!r} is not among the trials given")
    ref = np.asarray(folds[best], dtype=float)
    out: dict[int, dict[str, Any]] = {}
    for key, values in folds.items():
        a = np.asarray(values, dtype=float)
        if key == best:
            out[key] = {
                "p_value": 1.0,
                "mean_diff": 0.0,
                "n": int(np.sum(~np.isnan(a))),
                "not_worse": True,
            }
            continue
        same_folds = a.size == ref.size and (
            splits is None or fold_members(splits.get(key)) == fold_members(splits.get(best))
        )
        if not same_folds:
            out[key] = {"p_value": _NAN, "mean_diff": _NAN, "n": 0, "not_worse": None}
            continue
        n_train, n_val = _fold_sizes(splits.get(best) if splits else None, a.size)
        res = corrected_paired_ttest(a, ref, n_train, n_val, alternative="less")
        p = float(res["p_value"])
        out[key] = {
            "p_value": p,
            "mean_diff": float(res["mean_diff"]),
            "n": int(res["n"]),
            "not_worse": None if math.isnan(p) else bool(p >= alpha),
        }
    return out


def _fold_sizes(splits: Any, k: int) -> tuple[list[float] | float, list[float] | float]:
    """Per-fold training and validation sizes for the correction; without a record, the
    K-fold ratio (K-1):1."""
    if isinstance(splits, list) and len(splits) == k and k:
        try:
            return (
                [float(s["n_train"]) for s in splits],
                [float(s["n_val"]) for s in splits],
            )
        except (KeyError, TypeError, ValueError):
            pass
    return float(max(k - 1, 1)), 1.0


def leaderboard(records: pd.DataFrame, *, alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """COMPLETE trials with a finite score, best first; ties broken by latency, parameters,
    trial number. Adds ``rank`` (1-based), ``p_vs_best``, ``diff_vs_best`` and ``not_worse``
    (see :func:`not_worse_than_best`)."""
    if records.empty:
        return records.assign(rank=pd.Series(dtype=int))
    done = records[(records["state"] == "COMPLETE") & records["value"].notna()].copy()
    if done.empty:
        return done.assign(
            rank=pd.Series(dtype=int),
            p_vs_best=pd.Series(dtype=float),
            diff_vs_best=pd.Series(dtype=float),
            not_worse=pd.Series(dtype=object),
        )
    done["_lat"] = done["latency_ms"].fillna(math.inf)
    done["_par"] = done["params_total"].fillna(math.inf)
    done = done.sort_values(
        ["value", "_lat", "_par", "number"], ascending=[False, True, True, True], kind="mergesort"
    ).drop(columns=["_lat", "_par"])
    done.insert(0, "rank", range(1, len(done) + 1))
    best = int(done.iloc[0]["number"])
    marks = not_worse_than_best(
        {int(r.number): list(r.folds) for r in done.itertuples()},
        best,
        alpha=alpha,
        splits={int(r.number): json_safe(r.splits) for r in done.itertuples()},
    )
    done["p_vs_best"] = [marks[int(n)]["p_value"] for n in done["number"]]
    done["diff_vs_best"] = [marks[int(n)]["mean_diff"] for n in done["number"]]
    done["not_worse"] = pd.Series(
        [marks[int(n)]["not_worse"] for n in done["number"]], index=done.index, dtype=object
    )
    return done.reset_index(drop=True)


def best_per_group(board: pd.DataFrame, by: str) -> pd.DataFrame:
    """The top-ranked trial of each value of `by` (backbone, frozen_depth, head, ...), with
    ``n_trials`` ranked in that group; groups in the order of their best trial's rank."""
    if board.empty or by not in board:
        return pd.DataFrame(columns=[by, "n_trials", "rank", "number", "value"])
    key = board[by].astype(str).where(board[by].notna(), "?")
    counts = key.value_counts()
    first = board.assign(_k=key).drop_duplicates("_k", keep="first")
    first = first.assign(n_trials=[int(counts[k]) for k in first["_k"]])
    first[by] = first["_k"]
    cols = [
        by,
        "n_trials",
        "rank",
        "number",
        "value",
        "ci_low",
        "ci_high",
        "n_folds",
        "accuracy",
        "covid_sensitivity",
        "covid_specificity",
        "latency_ms",
        "params_total",
        "not_worse",
        "params_text",
    ]
    return first[[c for c in cols if c in first]].reset_index(drop=True)


def compare_best_per_backbone(board_a: pd.DataFrame, board_b: pd.DataFrame) -> pd.DataFrame:
    """Side by side: the best trial per backbone of two studies' leaderboards (ranked on the
    same metric); columns ``a_*`` / ``b_*`` and ``difference`` (a − b)."""
    ga = best_per_group(board_a, "backbone")
    gb = best_per_group(board_b, "backbone")
    names = list(dict.fromkeys([*ga.get("backbone", []), *gb.get("backbone", [])]))
    rows = []
    for name in names:
        row: dict[str, Any] = {"backbone": name}
        for tag, g in (("a", ga), ("b", gb)):
            hit = g[g["backbone"] == name] if not g.empty else g
            if len(hit):
                r = hit.iloc[0]
                row.update(
                    {
                        f"{tag}_trial": int(r["number"]),
                        f"{tag}_value": r["value"],
                        f"{tag}_ci_low": r["ci_low"],
                        f"{tag}_ci_high": r["ci_high"],
                        f"{tag}_n_trials": int(r["n_trials"]),
                    }
                )
            else:
                row.update(
                    {
                        f"{tag}_trial": None,
                        f"{tag}_value": _NAN,
                        f"{tag}_ci_low": _NAN,
                        f"{tag}_ci_high": _NAN,
                        f"{tag}_n_trials": 0,
                    }
                )
        row["difference"] = row["a_value"] - row["b_value"]
        rows.append(row)
    return pd.DataFrame(rows)
