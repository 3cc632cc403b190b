"""The report's tables and sentences as plain rows and strings (leaderboard, groupings, paper
table, study comparison, operating points, ensemble, test split), shared by the HTML page, the
Markdown file and the console; `_files.py` writes them out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from automl_cxr.report._data import ReportData
from automl_cxr.report._paper import PAPER_KEYS
from automl_cxr.report._records import STATES

__all__ = [
    "OPERATING_NOTE",
    "calibration_legend",
    "compare_rows",
    "counts_text",
    "describe_test_split",
    "ensemble_rows",
    "ensemble_text",
    "fmt_ci",
    "fmt_pct_ci",
    "group_rows",
    "leaderboard_rows",
    "mark_legend",
    "markdown_table",
    "operating_rows",
    "paper_rows",
]

_MARK = {True: "≈ best", False: "", None: "n/a"}


def _isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_ci(mean: Any, lo: Any, hi: Any, digits: int = 4) -> str:
    """`0.9123 [0.8810, 0.9436]`; `-` without a mean; no bracket without an interval."""
    if _isnan(mean):
        return "-"
    s = f"{mean:.{digits}f}"
    if not (_isnan(lo) or _isnan(hi)):
        s += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return s


def fmt_pct_ci(mean: Any, lo: Any, hi: Any) -> str:
    """`96.78% (95.1–98.4)` in percent; `-` without a mean."""
    if _isnan(mean):
        return "-"
    s = f"{100 * mean:.2f}%"
    if not (_isnan(lo) or _isnan(hi)):
        s += f" ({100 * lo:.1f}–{100 * hi:.1f})"
    return s


def _fmt_num(x: Any, spec: str) -> str:
    return "-" if _isnan(x) else format(x, spec)


def _cell(x: Any) -> str:
    s = "-" if _isnan(x) else str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    """A GitHub-flavoured Markdown table (cells escaped for `|`)."""
    align = align or ["left"] * len(header)
    sep = {"left": ":--", "right": "--:", "center": ":-:"}
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "| " + " | ".join(sep[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def leaderboard_rows(data: ReportData, k: int | None = None) -> tuple[list[str], list[list]]:
    """Header and formatted rows of the leaderboard (top `k`, all when None)."""
    m = data.metric
    header = [
        "rank",
        "",
        "trial",
        f"{m} [95% CI]",
        "COVID sensitivity",
        "COVID specificity",
        "ECE [95% CI]",
        "backbone",
        "frozen",
        "head",
        "lr",
        "latency ms",
        "params",
        *(f"external {name} [95% CI]" for name in data.externals),
    ]
    board = data.board if k is None else data.board.head(k)
    rows = []
    for r in board.to_dict(orient="records"):
        rows.append(
            [
                r["rank"],
                _MARK[r["not_worse"]],
                r["number"],
                fmt_ci(r["value"], r["ci_low"], r["ci_high"]),
                fmt_ci(
                    r["covid_sensitivity"],
                    r["covid_sensitivity_ci_low"],
                    r["covid_sensitivity_ci_high"],
                    3,
                ),
                fmt_ci(
                    r["covid_specificity"],
                    r["covid_specificity_ci_low"],
                    r["covid_specificity_ci_high"],
                    3,
                ),
                fmt_ci(r.get("ece"), r.get("ece_ci_low"), r.get("ece_ci_high"), 3),
                r["backbone"],
                r["frozen_depth"] or "-",
                r["head"],
                _fmt_num(r["lr"], ".2e"),
                _fmt_num(r["latency_ms"], ".2f"),
                "-" if _isnan(r["params_total"]) else f"{int(r['params_total']):,}",
                *(
                    fmt_ci(
                        r.get(f"ext_{name}"),
                        r.get(f"ext_{name}_ci_low"),
                        r.get(f"ext_{name}_ci_high"),
                        3,
                    )
                    for name in data.externals
                ),
            ]
        )
    return header, rows


def group_rows(data: ReportData, frame: pd.DataFrame, by: str) -> tuple[list[str], list[list]]:
    header = [
        by.replace("_", " "),
        "trials",
        "best trial",
        "rank",
        f"{data.metric} [95% CI]",
        "COVID sens.",
        "COVID spec.",
        "latency ms",
        "",
    ]
    rows = [
        [
            r[by],
            r["n_trials"],
            r["number"],
            r["rank"],
            fmt_ci(r["value"], r["ci_low"], r["ci_high"]),
            _fmt_num(r["covid_sensitivity"], ".3f"),
            _fmt_num(r["covid_specificity"], ".3f"),
            _fmt_num(r["latency_ms"], ".2f"),
            _MARK[r["not_worse"]],
        ]
        for r in frame.to_dict(orient="records")
    ]
    return header, rows


def paper_rows(data: ReportData) -> tuple[list[str], list[list]]:
    header = [
        "",
        "trial",
        "backbone",
        "accuracy (all classes)",
        "COVID-19 vs rest accuracy",
        "COVID-19 sensitivity",
        "COVID-19 specificity",
    ]
    rows = []
    for r in data.paper.to_dict(orient="records"):
        rows.append(
            [
                r["row"],
                "-" if _isnan(r["trial"]) else int(r["trial"]),
                r["backbone"],
                *(fmt_pct_ci(r[k], r[f"{k}_ci_low"], r[f"{k}_ci_high"]) for k in PAPER_KEYS),
            ]
        )
    return header, rows


def compare_rows(data: ReportData) -> tuple[list[str], list[list]]:
    a, b = data.study_name, data.compare_name or "other"
    header = [
        "backbone",
        f"{a}: trial",
        f"{a}: {data.metric} [95% CI]",
        f"{b}: trial",
        f"{b}: {data.metric} [95% CI]",
        "difference",
    ]
    rows = []
    for r in data.compare.to_dict(orient="records"):
        rows.append(
            [
                r["backbone"],
                "-" if _isnan(r["a_trial"]) else int(r["a_trial"]),
                fmt_ci(r["a_value"], r["a_ci_low"], r["a_ci_high"]),
                "-" if _isnan(r["b_trial"]) else int(r["b_trial"]),
                fmt_ci(r["b_value"], r["b_ci_low"], r["b_ci_high"]),
                _fmt_num(r["difference"], "+.4f"),
            ]
        )
    return header, rows


def operating_rows(data: ReportData) -> tuple[list[str], list[list]]:
    """The operating point of each top trial on the positive class (out-of-fold): threshold
    chosen on all folds, sensitivity/specificity cross-fitted (threshold from the other
    folds), the in-sample pair beside them."""
    header = [
        "trial",
        "rule",
        "threshold",
        "sensitivity [95% CI]",
        "specificity [95% CI]",
        "in-sample sens/spec",
    ]
    rows = []
    for op in data.oof.operating if data.oof else []:
        rows.append(
            [
                op["number"],
                op["point"],
                f"{op['threshold']:.3f}",
                fmt_ci(op["sensitivity"], op["sensitivity_ci_low"], op["sensitivity_ci_high"], 3),
                fmt_ci(op["specificity"], op["specificity_ci_low"], op["specificity_ci_high"], 3),
                f"{op['in_sample_sensitivity']:.3f}/{op['in_sample_specificity']:.3f}",
            ]
        )
    return header, rows


OPERATING_NOTE = (
    "Cross-fitted: for each validation fold the threshold is chosen on the other folds' "
    "out-of-fold predictions and applied to it; sensitivity and specificity are those of the "
    "pooled held-out calls, CIs from a patient-level bootstrap. The threshold shown is chosen "
    "on all folds (what export --operating-point bakes in); the in-sample pair is scored on the "
    "predictions it was chosen on, so it meets the rule by construction. Under --cv site a "
    "fold may hold one class only: its calls still count towards the pooled rates."
)


def ensemble_rows(data: ReportData) -> tuple[list[str], list[list]]:
    """Members of the selected ensemble: trial, weight, its own out-of-fold score."""
    ens = data.oof.ensemble if data.oof else None
    header = ["trial", "weight", f"single {data.metric}"]
    if not ens:
        return header, []
    return header, [
        [m["number"], f"{m['weight']:.3f}", f"{m['single_score']:.4f}"] for m in ens["members"]
    ]


def ensemble_text(data: ReportData) -> list[str]:
    """Sentences on the ensemble: its score beside the best single trial, and the nested one."""
    ens = data.oof.ensemble if data.oof else None
    if not ens:
        return []
    out = [
        f"Caruana selection ({ens['n_rounds']} rounds, with replacement, over "
        f"{ens['candidates']} complete trials): {data.metric} {ens['score']:.4f} for the "
        f"{len(ens['members'])}-trial ensemble vs {ens['best_single_score']:.4f} for the best "
        f"single trial ({ens['best_single']}), on the same out-of-fold predictions; "
        + ens["caveat"]
    ]
    nested = ens.get("nested") or {}
    if nested.get("available"):
        e, b = nested["ensemble"], nested["best_single"]
        out.append(
            f"Nested estimate (mean over {len(e['folds'])} held-out folds, 95 % t-interval): "
            f"ensemble {fmt_ci(e['mean'], max(0.0, e['ci_low']), min(1.0, e['ci_high']))}, "
            f"best single {fmt_ci(b['mean'], max(0.0, b['ci_low']), min(1.0, b['ci_high']))}."
        )
    elif nested:
        out.append(f"No nested estimate: {nested.get('reason')}.")
    return out


def _ci(f: dict | None) -> str:
    if not f or f.get("estimate", f.get("mean")) is None:
        return "n/a"
    est = f.get("estimate", f.get("mean"))
    lo, hi = f.get("ci_low"), f.get("ci_high")
    if lo is None or hi is None:
        return f"{est:.4f}"
    return fmt_ci(est, max(0.0, lo), min(1.0, hi))


def describe_test_split(data: ReportData) -> list[str]:
    """Sentences on the search's test split: what it holds, the best-by-CV trial's figure on
    it beside its CV estimate, the selected ensemble's beside its nested estimate."""
    t = data.oof.test if data.oof else None
    if not t:
        return []
    from automl_cxr.study import describe_held

    info = t["info"]
    one = [c for c, n in info["classes"].items() if n == 0]
    out = [
        f"Test split ({info['spec']}, drawn by seed {info['seed']} before the search and never "
        f"seen by it): {describe_held(info)}."
        + (
            f" It holds no {', '.join(one)} image: metrics are those of the classes it holds."
            if one
            else ""
        )
    ]
    if t.get("note"):
        out.append(f"No test figure: {t['note']}.")
        return out
    m, b = t["metric"], t["best"]
    out.append(
        f"Best-by-CV trial {b['number']} (its fold models averaged): {m} on the test split "
        f"{_ci(b)} (patient bootstrap, {b['n_units']} patients) vs its CV estimate {_ci(b['cv'])}."
    )
    e = t.get("ensemble")
    if e:
        out.append(
            f"Selected ensemble (trials {', '.join(map(str, e['members']))}): {m} on the test "
            f"split {_ci(e)} vs its nested estimate {_ci(e['nested'])}."
        )
    out.append("These are the figures a paper or a clinic can quote for this search.")
    return out


def calibration_legend() -> str:
    return (
        "ECE: top-label expected calibration error of the pooled out-of-fold probabilities "
        "(15 bins), 95 % CI from a patient-level bootstrap; 0 is perfectly calibrated."
    )


def counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in STATES[:4]) + (
        f", {counts['WAITING']} waiting" if counts.get("WAITING") else ""
    )


def mark_legend(data: ReportData) -> str:
    return (
        f"≈ best: not significantly worse than the best trial (one-sided corrected resampled "
        f"paired t-test, Nadeau & Bengio 2003, on the "
        f"same {int(data.board['n_folds'].max()) if len(data.board) else 0} folds, "
        f"α = {data.alpha}, uncorrected): these trials are equally good within the evidence; "
        "n/a: the test needs at least 2 paired folds. Ties on the score are broken by lower "
        "latency, then fewer parameters."
    )
