"""The held-out-hospital AUC of every complete trial of the site-CV studies in this folder
(ROBUST.md, "Reading it, and what is left"): balanced accuracy at the best threshold is at most
the area under the ROC curve's convex hull, so these AUCs bound what any other selection rule
or operating point could reach among these models.

Usage: python results/generalisation/robust/auc_bound.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from automl_cxr.study import external_attr_key, load_study

HERE = Path(__file__).resolve().parent


def main() -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    auc, bacc, studies = [], [], 0
    for db in sorted(HERE.glob("*_site.db")):
        study = load_study(str(db))
        studies += 1
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs.get(external_attr_key("cohen_sites_binary", "auc"))
            b = t.user_attrs.get(external_attr_key("cohen_sites_binary", "balanced_accuracy"))
            if a is not None and b is not None:
                auc.append(a)
                bacc.append(b)
    a, b = np.array(auc), np.array(bacc)
    print(
        f"{len(a)} complete trials of {studies} site-CV studies: cohen_sites AUC "
        f"{a.min():.3f}-{a.max():.3f} (median {np.median(a):.3f}, {int((a >= 0.75).sum())} at "
        f"least 0.75); balanced accuracy at the default threshold at most {b.max():.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
