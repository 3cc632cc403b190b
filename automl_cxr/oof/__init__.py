"""Out-of-fold predictions of a study's COMPLETE trials, and what is computed from them after
the search without retraining: calibration (ECE, reliability, temperature scaling), operating
points on the positive class, and Caruana ensemble selection across trials.

Plain NumPy/scikit-learn/torchmetrics: nothing here draws (the report and the dashboard do).
"""

from __future__ import annotations

from automl_cxr.oof._calibration import (
    DEFAULT_BINS,
    apply_temperature,
    calibration_summary,
    ece,
    fit_temperature,
    reliability_curve,
)
from automl_cxr.oof._crossfit import (
    CROSSFIT_PARTS,
    crossfit_operating_point,
    crossfit_parts,
    crossfit_temperature,
)
from automl_cxr.oof._ensemble import (
    ENSEMBLE_CAVEAT,
    ENSEMBLE_ROUNDS,
    caruana_select,
    fold_score,
    metric_scorer,
    nested_selection,
    select_ensemble,
)
from automl_cxr.oof._store import (
    ARTIFACTS_ENV,
    OOF_ATTR,
    OOF_FORMAT,
    OofPredictions,
    TestPredictions,
    artifact_dir,
    artifact_store,
    load_oof,
    load_study_oof,
    oof_arrays,
    save_oof,
)
from automl_cxr.oof._threshold import (
    RULES,
    choose_threshold,
    decide,
    operating_point,
    parse_operating_point,
    rates_at,
)

__all__ = [
    "ARTIFACTS_ENV",
    "ENSEMBLE_CAVEAT",
    "ENSEMBLE_ROUNDS",
    "select_ensemble",
    "CROSSFIT_PARTS",
    "crossfit_operating_point",
    "crossfit_parts",
    "crossfit_temperature",
    "rates_at",
    "DEFAULT_BINS",
    "RULES",
    "apply_temperature",
    "calibration_summary",
    "caruana_select",
    "choose_threshold",
    "decide",
    "ece",
    "fit_temperature",
    "fold_score",
    "metric_scorer",
    "nested_selection",
    "operating_point",
    "parse_operating_point",
    "reliability_curve",
    "OOF_ATTR",
    "OOF_FORMAT",
    "OofPredictions",
    "TestPredictions",
    "artifact_dir",
    "artifact_store",
    "load_oof",
    "load_study_oof",
    "oof_arrays",
    "save_oof",
]
