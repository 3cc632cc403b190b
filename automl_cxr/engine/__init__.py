"""Trial engine: patient- or site-grouped folds, training, metrics, frozen-feature cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from automl_cxr._lazy import lazy_exports

# Lazy: `automl-cxr report`/`dashboard` need only the light parts; torch loads on first use.
_EXPORTS = {
    "CV_FOLDS": "automl_cxr.engine._config",
    "CV_MODES": "automl_cxr.engine._config",
    "OPTIMIZERS": "automl_cxr.engine._config",
    "SCHEDULES": "automl_cxr.engine._config",
    "TrainConfig": "automl_cxr.engine._config",
    "FeatureCache": "automl_cxr.engine._features",
    "feature_key": "automl_cxr.engine._features",
    "SCALAR_METRICS": "automl_cxr.engine._metrics",
    "WORST_FOLD_METRICS": "automl_cxr.engine._metrics",
    "fold_metric": "automl_cxr.engine._metrics",
    "bootstrap_metrics": "automl_cxr.engine._inference",
    "metric_figure": "automl_cxr.engine._inference",
    "compute_metrics": "automl_cxr.engine._metrics",
    "confusion_scalars": "automl_cxr.engine._metrics",
    "confusion_scalar": "automl_cxr.engine._metrics",
    "CONFUSION_METRICS": "automl_cxr.engine._metrics",
    "WeightedEvaluator": "automl_cxr.engine._metrics",
    "corrected_paired_ttest": "automl_cxr.engine._inference",
    "roc_curves": "automl_cxr.engine._metrics",
    "scalar_metrics": "automl_cxr.engine._metrics",
    "bootstrap_weights": "automl_cxr.engine._inference",
    "group_bootstrap_weights": "automl_cxr.engine._inference",
    "available_metrics": "automl_cxr.engine._metrics",
    "summarize_folds": "automl_cxr.engine._inference",
    "Split": "automl_cxr.engine._splits",
    "assert_no_patient_leakage": "automl_cxr.engine._splits",
    "assert_no_site_leakage": "automl_cxr.engine._splits",
    "make_site_splits": "automl_cxr.engine._splits",
    "make_splits": "automl_cxr.engine._splits",
    "members_hash": "automl_cxr.engine._splits",
    "split_summary": "automl_cxr.engine._splits",
    "Reporter": "automl_cxr.engine._session",
    "TrialResult": "automl_cxr.engine._trial",
    "dataset_sites": "automl_cxr.engine._folds",
    "group_balance_weights": "automl_cxr.engine._folds",
    "dataset_splits": "automl_cxr.engine._folds",
    "FIT_STOPS": "automl_cxr.engine._trial",
    "fit_folds": "automl_cxr.engine._trial",
    "fit_full": "automl_cxr.engine._trial",
    "resolve_device": "automl_cxr.engine._device",
    "cpu_bf16_supported": "automl_cxr._compat.torch",
    "row_identities": "automl_cxr.engine._folds",
    "run_precision": "automl_cxr.engine._device",
    "run_trial": "automl_cxr.engine._trial",
}

__all__ = [
    "CONFUSION_METRICS",
    "WeightedEvaluator",
    "confusion_scalar",
    "confusion_scalars",
    "CV_FOLDS",
    "CV_MODES",
    "OPTIMIZERS",
    "SCALAR_METRICS",
    "SCHEDULES",
    "WORST_FOLD_METRICS",
    "FIT_STOPS",
    "FeatureCache",
    "Reporter",
    "Split",
    "TrainConfig",
    "TrialResult",
    "assert_no_patient_leakage",
    "assert_no_site_leakage",
    "available_metrics",
    "bootstrap_metrics",
    "bootstrap_weights",
    "metric_figure",
    "compute_metrics",
    "corrected_paired_ttest",
    "cpu_bf16_supported",
    "dataset_sites",
    "group_balance_weights",
    "dataset_splits",
    "feature_key",
    "fit_folds",
    "fit_full",
    "fold_metric",
    "group_bootstrap_weights",
    "make_site_splits",
    "make_splits",
    "members_hash",
    "resolve_device",
    "roc_curves",
    "row_identities",
    "run_precision",
    "run_trial",
    "scalar_metrics",
    "split_summary",
    "summarize_folds",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from automl_cxr._compat.torch import cpu_bf16_supported  # noqa: F401
    from automl_cxr.engine._config import (  # noqa: F401
        CV_FOLDS,
        CV_MODES,
        OPTIMIZERS,
        SCHEDULES,
        TrainConfig,
    )
    from automl_cxr.engine._device import resolve_device, run_precision  # noqa: F401
    from automl_cxr.engine._features import FeatureCache, feature_key  # noqa: F401
    from automl_cxr.engine._folds import (  # noqa: F401
        dataset_sites,
        dataset_splits,
        group_balance_weights,
        row_identities,
    )
    from automl_cxr.engine._inference import (  # noqa: F401
        bootstrap_metrics,
        bootstrap_weights,
        corrected_paired_ttest,
        group_bootstrap_weights,
        metric_figure,
        summarize_folds,
    )
    from automl_cxr.engine._metrics import (  # noqa: F401
        SCALAR_METRICS,
        WORST_FOLD_METRICS,
        WeightedEvaluator,
        available_metrics,
        compute_metrics,
        confusion_scalars,
        fold_metric,
        roc_curves,
        scalar_metrics,
    )
    from automl_cxr.engine._session import Reporter  # noqa: F401
    from automl_cxr.engine._splits import (
        Split,
        assert_no_patient_leakage,
        assert_no_site_leakage,
        make_site_splits,
        make_splits,
        members_hash,
        split_summary,
    )  # noqa: F401
    from automl_cxr.engine._trial import (  # noqa: F401
        FIT_STOPS,
        TrialResult,
        fit_folds,
        fit_full,
        run_trial,
    )
