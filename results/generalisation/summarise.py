"""Summarise the results/generalisation studies: per study, the best trial by cross-validation
(as the search ranks them) with its CV estimate and its figures on every external set, and over
all COMPLETE trials how far the CV estimate sits from the external figure.

Usage: python results/generalisation/summarise.py [STUDY.db ...]  (default: every *.db here)
Writes summary.json and summary.md beside this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from automl_cxr.report import build_report_data
from automl_cxr.study import load_study

HERE = Path(__file__).resolve().parent
HEADLINE = "adult_holdout"  # both classes, every held-out patient


def _fmt(v, lo=None, hi=None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}–{hi:.3f}]"


def summarise(db: Path) -> dict:
    study = load_study(str(db))
    data = build_report_data(study, operating_point=None)
    attrs = study.user_attrs
    best = data.board.iloc[0]
    ext = {}
    for name in data.externals:
        ext[name] = {
            "value": float(best.get(f"ext_{name}", np.nan)),
            "ci_low": float(best.get(f"ext_{name}_ci_low", np.nan)),
            "ci_high": float(best.get(f"ext_{name}_ci_high", np.nan)),
        }

    def over_trials(prefix: str) -> dict:
        name = next((n for n in data.externals if n.startswith(prefix)), None)
        g = data.gap[data.gap["external"] == name] if name else data.gap.head(0)
        ok = len(g) > 2 and g["cv"].std() > 0 and g["ext"].std() > 0
        return {
            "external": name,
            "n": int(len(g)),
            "mean_gap": float(g["gap"].mean()) if len(g) else None,
            "mean_abs_gap": float(g["gap"].abs().mean()) if len(g) else None,
            "corr_cv_external": float(np.corrcoef(g["cv"], g["ext"])[0, 1]) if ok else None,
        }

    return {
        "study": study.study_name,
        "file": db.name,
        "dataset": attrs.get("dataset"),
        "cv": attrs.get("cv", "patient"),
        "folds": len((attrs.get("protocol") or {}).get("folds") or []),
        "fold_warnings": (attrs.get("protocol") or {}).get("fold_warnings"),
        "cramers_v": attrs.get("source_label_alignment", {}).get("cramers_v"),
        "counts": data.counts,
        "metric": data.metric,
        "best": {
            "number": int(best["number"]),
            "params": best["params"],
            "cv": float(best["value"]),
            "cv_ci_low": float(best["ci_low"]),
            "cv_ci_high": float(best["ci_high"]),
            "covid_sensitivity": float(best["covid_sensitivity"]),
            "covid_specificity": float(best["covid_specificity"]),
            "external": ext,
        },
        "all_trials": {p: over_trials(p) for p in (HEADLINE, "cohen_sites")},
    }


def main(argv: list[str]) -> int:
    dbs = [Path(a) for a in argv] or sorted(HERE.glob("*.db"))
    rows = [summarise(db) for db in dbs]
    (HERE / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    lines = [
        "| study | cv | folds | trials (complete/pruned) | best trial: CV balanced acc. "
        "[95 % CI] | external adult_holdout | cohen_sites | nih_holdout | CV − adult_holdout | "
        "CV − cohen_sites |",
        "| --- | --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        b, e = r["best"], r["best"]["external"]

        def ext(prefix: str, e=e) -> str:
            k = next((n for n in e if n.startswith(prefix)), None)
            return _fmt(e[k]["value"], e[k]["ci_low"], e[k]["ci_high"]) if k else "–"

        def gap(prefix: str, e=e, b=b) -> str:
            k = next((n for n in e if n.startswith(prefix)), None)
            return f"{b['cv'] - e[k]['value']:+.3f}" if k else "–"

        c = r["counts"]
        lines.append(
            f"| {r['dataset']} | {r['cv']} | {r['folds']} | {c.get('COMPLETE', 0)}/"
            f"{c.get('PRUNED', 0)} | {_fmt(b['cv'], b['cv_ci_low'], b['cv_ci_high'])} | "
            f"{ext('adult_holdout')} | {ext('cohen_sites')} | {ext('nih_holdout')} | "
            f"{gap('adult_holdout')} | {gap('cohen_sites')} |"
        )
    lines += [
        "",
        "| study | cv | external set | complete trials scored | mean gap CV − external | "
        "mean abs. gap | corr(CV, external) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        for a in r["all_trials"].values():
            if not a["external"]:
                continue
            corr = "–" if a["corr_cv_external"] is None else f"{a['corr_cv_external']:+.2f}"
            mg = "–" if a["mean_gap"] is None else f"{a['mean_gap']:+.3f}"
            mag = "–" if a["mean_abs_gap"] is None else f"{a['mean_abs_gap']:.3f}"
            lines.append(
                f"| {r['dataset']} | {r['cv']} | {a['external']} | {a['n']} | {mg} | {mag} | "
                f"{corr} |"
            )
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
