"""Each lever alone, everything else equal: the best configurations of the no-lever study
(none_site) retrained with one lever changed at a time (and with all of them), on the same
site-held-out folds and seed, each scored on the external sets. A paired ablation: the study
ablations (run.sh) let TPE and Hyperband choose, so their per-lever means compare different
configurations; here only the lever differs.

Usage: python results/generalisation/robust/paired.py [DATA_DIR] [--configs K]
                 [--variants "no lever,group_dro=0.3,..."] [--out paired]
Writes OUT.json and OUT.md beside this file (paired.json / paired.md by default).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from optuna.trial import TrialState
from probe_data import external_sets

from automl_cxr.data import load_dataset
from automl_cxr.deploy._select import trial_spec
from automl_cxr.engine import run_trial
from automl_cxr.study import load_study

HERE = Path(__file__).resolve().parent
EXTERNALS = ("cohen_sites_binary", "adult_holdout_binary", "nih_holdout_binary")
VARIANTS = {
    "no lever": {},
    "roi=lung_crop": {"roi": "lung_crop"},
    "roi=lung_mask": {"roi": "lung_mask"},
    "intensity=equalize": {"intensity": "equalize"},
    "intensity=clahe": {"intensity": "clahe"},
    "site_adversarial=0.3": {"site_adversarial": 0.3},
    "site_adversarial=1": {"site_adversarial": 1.0},
    "source_balance": {"source_balance": True},
    "group_dro=0.1": {"group_dro": 0.1},
    "group_dro=0.3": {"group_dro": 0.3},
    "group_dro=1": {"group_dro": 1.0},
    "group_dro=0.3+adjust=1": {"group_dro": 0.3, "group_dro_adjust": 1.0},
    "group_dro=0.3+adjust=3": {"group_dro": 0.3, "group_dro_adjust": 3.0},
    "lung_crop+source_balance": {"roi": "lung_crop", "source_balance": True},
    "all four": {
        "roi": "lung_mask",
        "intensity": "clahe",
        "site_adversarial": 0.3,
        "source_balance": True,
    },
}


def main(argv: list[str]) -> int:
    data_dir = (
        Path(argv[0]) if argv and not argv[0].startswith("--") else Path("data/generalisation")
    )
    k = int(argv[argv.index("--configs") + 1]) if "--configs" in argv else 2
    out = argv[argv.index("--out") + 1] if "--out" in argv else "paired"
    variants = VARIANTS
    if "--variants" in argv:
        names = argv[argv.index("--variants") + 1].split(",")
        if unknown := sorted(set(names) - set(VARIANTS)):
            raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
        variants = {n: VARIANTS[n] for n in ["no lever", *names] if n in VARIANTS}
    study = load_study(str(HERE / "none_site.db"))
    done = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
        key=lambda t: -t.value,
    )
    seen, picks = set(), []
    for t in done:  # distinct configurations, best first
        key = json.dumps(t.params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            picks.append(t)
        if len(picks) == k:
            break
    ds = load_dataset("binary_adult", data_dir)
    exts = external_sets(ds, data_dir, EXTERNALS)
    seg = str(data_dir / "lungs" / "segmenter.pt")
    rows = []
    for t in picks:
        spec = trial_spec(study, t)
        for name, change in variants.items():
            cfg = dataclasses.replace(spec.train, segmenter=seg, **change)
            t0 = time.perf_counter()
            res = run_trial(ds, spec.model, cfg, metric="balanced_accuracy", externals=exts)
            s = res.summary["metrics"]["balanced_accuracy"]
            row = {
                "trial": t.number,
                "config": t.params,
                "variant": name,
                "cv": s["mean"],
                "cv_ci": [s["ci_low"], s["ci_high"]],
                "worst_site": res.summary["metrics"]["worst_site_balanced_accuracy"]["mean"],
                "seconds": round(time.perf_counter() - t0, 1),
                "fallbacks": res.preprocess.get("fallbacks"),
                "group_weights": [f.get("group_weights") for f in res.splits],
            }
            for e in res.externals.values():
                b = e["bootstrap"]["metrics"]["balanced_accuracy"]
                row[e["dataset"]] = {
                    "value": e["metrics"]["balanced_accuracy"],
                    "ci": [b["ci_low"], b["ci_high"]],
                }
            rows.append(row)
            print(
                f"trial {t.number} {name:26s} CV {row['cv']:.3f}  cohen_sites "
                f"{row['cohen_sites_binary']['value']:.3f}  ({row['seconds']} s)",
                flush=True,
            )
    (HERE / f"{out}.json").write_text(json.dumps(rows, indent=2, default=str))
    lines = [
        "| base trial | variant | CV balanced acc. [95 % CI] | worst site fold | cohen_sites "
        "[95 % CI] | adult_holdout | nih_holdout | Δ cohen_sites vs no lever |",
        "| --- | --- | --- | ---: | --- | --- | --- | ---: |",
    ]
    base = {r["trial"]: r for r in rows if r["variant"] == "no lever"}
    for r in rows:

        def f(e: str, r=r) -> str:
            v = r[e]
            return f"{v['value']:.3f} [{v['ci'][0]:.3f}–{v['ci'][1]:.3f}]"

        d = r["cohen_sites_binary"]["value"] - base[r["trial"]]["cohen_sites_binary"]["value"]
        lines.append(
            f"| {r['trial']} | {r['variant']} | {r['cv']:.3f} [{r['cv_ci'][0]:.3f}–"
            f"{r['cv_ci'][1]:.3f}] | {r['worst_site']:.3f} | {f('cohen_sites_binary')} | "
            f"{r['adult_holdout_binary']['value']:.3f} | {r['nih_holdout_binary']['value']:.3f} | "
            f"{d:+.3f} |"
        )
    mean_d = {}
    for name in variants:
        ds_ = [
            r["cohen_sites_binary"]["value"] - base[r["trial"]]["cohen_sites_binary"]["value"]
            for r in rows
            if r["variant"] == name
        ]
        mean_d[name] = float(np.mean(ds_))
    lines += ["", "| variant | mean Δ cohen_sites over the base configurations |", "| --- | ---: |"]
    lines += [f"| {n} | {v:+.3f} |" for n, v in mean_d.items()]
    (HERE / f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
