"""Repeated site folds on real search trials: does averaging a trial's site-CV estimate over
several fold seeds rank the trials better for a new hospital? (ROBUST.md §5's open question)

Every COMPLETE trial of the named studies is re-run with its own parameters (`FixedTrial`,
the study's space and the cpu profile, `--cv site`) under seeds 1..K-1 (a seed draws the site
folds, the inner early-stopping split and the training order; seed 0 is the study's own run,
its stored value); the mean over the K seeds and the single-seed value are
then compared by their correlation with the trial's stored `cohen_sites` balanced accuracy
(scored by the search on 24 held-out Cohen hospitals, never used to choose anything here).

Usage: python results/generalisation/robust/repeat_probe.py [DATA_DIR] [--seeds K]
Writes repeat_probe.md and repeat_probe.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FixedTrial, TrialState

from automl_cxr.data import load_dataset
from automl_cxr.engine import FeatureCache
from automl_cxr.study import Objective, external_attr_key, get_profile, load_study, resolve_space

HERE = Path(__file__).resolve().parent
GEN = HERE.parent
STUDIES = {  # study -> the space it searched (the lung-ROI studies need the segmenter: left out)
    "none_site": GEN / "space.yaml",
    "balance_site": HERE / "space_balance.yaml",
    "intensity_site": HERE / "space_intensity.yaml",
    "adversarial_site": HERE / "space_adversarial.yaml",
    "resolution_site": HERE / "space_resolution.yaml",
    "lite2_site": HERE / "space_lite2.yaml",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=Path("data/generalisation"))
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dataset = load_dataset("binary_adult", args.data_dir)
    profile = get_profile("cpu")
    cache = FeatureCache()  # in memory, shared by every re-run
    rows = []
    for name, space_file in STUDIES.items():
        space = resolve_space(str(space_file), profile)
        study = load_study(str(HERE / f"{name}.db"))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            coh = t.user_attrs.get(external_attr_key("cohen_sites_binary", "balanced_accuracy"))
            values = [float(t.value)]
            t0 = time.perf_counter()
            for seed in range(1, args.seeds):
                obj = Objective(dataset, space, profile, seed=seed, cv="site", feature_cache=cache)
                values.append(float(obj(FixedTrial(dict(t.params)))))
            rows.append(
                {
                    "study": name,
                    "trial": t.number,
                    "backbone": t.params.get("backbone"),
                    "site_cv_by_seed": [round(v, 4) for v in values],
                    "seed0": values[0],
                    "mean": float(np.mean(values)),
                    "cohen_sites": float(coh),
                }
            )
            print(
                f"{name} #{t.number}: {values} mean {np.mean(values):.3f} cohen {coh:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    coh = np.array([r["cohen_sites"] for r in rows])
    lines = [
        f"{len(rows)} complete trials ({', '.join(STUDIES)}), {args.seeds} seeds each:",
        "",
        "| estimate | corr. with cohen_sites | best trial | its estimate | its cohen_sites |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for key in ("seed0", "mean"):
        v = np.array([r[key] for r in rows])
        b = rows[int(v.argmax())]
        lines.append(
            f"| {'seed 0 (the search)' if key == 'seed0' else f'mean of {args.seeds} seeds'} "
            f"| {np.corrcoef(v, coh)[0, 1]:+.2f} | {b['study']} #{b['trial']} ({b['backbone']}) "
            f"| {v.max():.3f} | {b['cohen_sites']:.3f} |"
        )
    (HERE / "repeat_probe.json").write_text(json.dumps(rows, indent=2) + "\n")
    (HERE / "repeat_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
