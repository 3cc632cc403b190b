"""Trial engine: patient-grouped folds, training, the paper's metrics, frozen-feature cache."""

from __future__ import annotations

from automl_cxr.engine._config import OPTIMIZERS, SCHEDULES, TrainConfig
from automl_cxr.engine._features import FeatureCache, feature_key
from automl_cxr.engine._metrics import (
    SCALAR_METRICS,
    bootstrap_metrics,
    compute_metrics,
    paired_comparison,
    roc_curves,
    scalar_metrics,
    summarize_folds,
)
from automl_cxr.engine._splits import Split, assert_no_patient_leakage, make_splits, split_summary
from automl_cxr.engine._trial import Reporter, TrialResult, fit_full, resolve_device, run_trial

__all__ = [
    "OPTIMIZERS",
    "SCALAR_METRICS",
    "SCHEDULES",
    "FeatureCache",
    "Reporter",
    "Split",
    "TrainConfig",
    "TrialResult",
    "assert_no_patient_leakage",
    "bootstrap_metrics",
    "compute_metrics",
    "feature_key",
    "fit_full",
    "make_splits",
    "paired_comparison",
    "resolve_device",
    "roc_curves",
    "run_trial",
    "scalar_metrics",
    "split_summary",
    "summarize_folds",
]
