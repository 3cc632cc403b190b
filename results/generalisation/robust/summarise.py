"""Summarise the issue-23 ablation (results/generalisation/robust/*.db): per study, the best
trial by cross-validation with its CV estimate and external figures (the same table as
../summary.md), the wall time, and over all COMPLETE trials the effect of each lever: mean CV and
mean external balanced accuracy with the lever at each value.

Usage: python results/generalisation/robust/summarise.py     (writes summary.md/json here)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from summarise import _fmt, summarise  # noqa: E402  (results/generalisation/summarise.py)

from automl_cxr.study import external_attr_key, load_study  # noqa: E402

ORDER = [
    "none_site",
    "balance_site",
    "roi_site",
    "intensity_site",
    "adversarial_site",
    "robust_site",
    "robust_patient",
    "none_rerun_site",
    "dro_site",
    "robust_dro_site",
]
LEVERS = {
    "roi": "roi",
    "intensity": "intensity",
    "site_adversarial": "site_adversarial",
    "source_balance": "source_balance",
    "group_dro": "group_dro",
}
EXTERNALS = ("adult_holdout_binary", "cohen_sites_binary", "nih_holdout_binary")


def _wall(name: str) -> float | None:
    log = HERE / f"{name}.search.log"
    if not log.is_file():
        return None
    m = re.search(r"wall_seconds (\d+)", log.read_text())
    return float(m.group(1)) if m else None


def lever_effects(db: Path) -> dict:
    study = load_study(str(db))
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict = {}
    for lever in LEVERS:
        by: dict = {}
        for t in done:
            if lever not in t.params:
                continue
            v = t.params[lever]
            key = (
                ("on" if float(v) > 0 else "off")
                if lever in ("site_adversarial", "group_dro")
                else str(v)
            )
            row = by.setdefault(key, {"n": 0, "cv": [], **{e: [] for e in EXTERNALS}})
            row["n"] += 1
            row["cv"].append(float(t.value))
            for e in EXTERNALS:
                x = t.user_attrs.get(external_attr_key(e, "balanced_accuracy"))
                if x is not None:
                    row[e].append(float(x))
        if by:
            out[lever] = {
                k: {
                    "n": r["n"],
                    **{m: float(np.mean(r[m])) if r[m] else None for m in ["cv", *EXTERNALS]},
                }
                for k, r in sorted(by.items())
            }
    fall = [t.user_attrs.get("preprocess", {}).get("fallbacks", {}) for t in done]
    fall = [f for f in fall if f]
    return {"levers": out, "fallbacks": fall[0] if fall else None}


def main() -> int:
    rows = []
    for name in ORDER:
        db = HERE / f"{name}.db"
        if not db.is_file():
            continue
        r = summarise(db)
        r["name"] = name
        r["wall_seconds"] = _wall(name)
        r.update(lever_effects(db))
        rows.append(r)
    (HERE / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    lines = [
        "| study | cv | trials (complete/pruned) | wall | best trial's levers | CV balanced acc. "
        "[95 % CI] | cohen_sites | adult_holdout | nih_holdout | CV − cohen_sites |",
        "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | ---: |",
    ]
    for r in rows:
        b, e, c = r["best"], r["best"]["external"], r["counts"]

        def ext(prefix: str, e=e) -> str:
            k = next((n for n in e if n.startswith(prefix)), None)
            return _fmt(e[k]["value"], e[k]["ci_low"], e[k]["ci_high"]) if k else "–"

        k = next((n for n in e if n.startswith("cohen_sites")), None)
        gap = f"{b['cv'] - e[k]['value']:+.3f}" if k else "–"
        p = b["params"] if isinstance(b["params"], dict) else {}
        lev = ", ".join(f"{x}={p[x]}" for x in LEVERS if x in p) or "–"
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r["wall_seconds"] else "–"
        lines.append(
            f"| {r['name']} | {r['cv']} | {c.get('COMPLETE', 0)}/{c.get('PRUNED', 0)} | {wall} | "
            f"{lev} | {_fmt(b['cv'], b['cv_ci_low'], b['cv_ci_high'])} | {ext('cohen_sites')} | "
            f"{ext('adult_holdout')} | {ext('nih_holdout')} | {gap} |"
        )
    lines += [
        "",
        "| study | lever | value | complete trials | mean CV | mean adult_holdout | "
        "mean cohen_sites | mean nih_holdout |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        for lever, vals in r["levers"].items():
            for v, s in vals.items():
                cells = [_fmt(s[m]) if s[m] is not None else "–" for m in ["cv", *EXTERNALS]]
                lines.append(
                    f"| {r['name']} | {lever} | {v} | {s['n']} | " + " | ".join(cells) + " |"
                )
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
