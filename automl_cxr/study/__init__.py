"""Studies: search spaces, profiles, the Optuna objective, and the runners (local / Ray Tune)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from automl_cxr._lazy import lazy_exports

# Lazy: `automl-cxr report`/`dashboard` need only the light parts; torch loads on first use.
_EXPORTS = {
    "OBJECTIVE_KEYS": "automl_cxr.study._record",
    "Objective": "automl_cxr.study._objective",
    "TrialPlan": "automl_cxr.study._objective",
    "json_safe": "automl_cxr.study._record",
    "subsample": "automl_cxr.study._objective",
    "Profile": "automl_cxr.study._profiles",
    "default_profile": "automl_cxr.study._profiles",
    "get_profile": "automl_cxr.study._profiles",
    "list_profiles": "automl_cxr.study._profiles",
    "FINISHED": "automl_cxr.study._runner",
    "adapt_space": "automl_cxr.study._runner",
    "PRUNERS": "automl_cxr.study._runner",
    "SAMPLERS": "automl_cxr.study._runner",
    "SearchSettings": "automl_cxr.study._runner",
    "SearchSummary": "automl_cxr.study._runner",
    "make_pruner": "automl_cxr.study._runner",
    "make_sampler": "automl_cxr.study._runner",
    "reconcile_dead_trials": "automl_cxr.study._runner",
    "run_search": "automl_cxr.study._runner",
    "resolve_space": "automl_cxr.study._runner",
    "ParamSpec": "automl_cxr.study._space",
    "SearchSpace": "automl_cxr.study._space",
    "load_space": "automl_cxr.study._space",
    "load_study": "automl_cxr.study._storage",
    "open_storage": "automl_cxr.study._storage",
    "storage_url": "automl_cxr.study._storage",
    "study_names": "automl_cxr.study._storage",
}

__all__ = [
    "FINISHED",
    "OBJECTIVE_KEYS",
    "PRUNERS",
    "SAMPLERS",
    "Objective",
    "ParamSpec",
    "Profile",
    "SearchSettings",
    "SearchSpace",
    "SearchSummary",
    "TrialPlan",
    "adapt_space",
    "default_profile",
    "get_profile",
    "json_safe",
    "list_profiles",
    "load_space",
    "load_study",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "reconcile_dead_trials",
    "resolve_space",
    "run_search",
    "storage_url",
    "study_names",
    "subsample",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from automl_cxr.study._objective import (
        OBJECTIVE_KEYS,
        Objective,
        TrialPlan,
        json_safe,
        subsample,
    )  # noqa: F401
    from automl_cxr.study._profiles import Profile, default_profile, get_profile, list_profiles  # noqa: F401
    from automl_cxr.study._runner import (
        FINISHED,
        PRUNERS,
        SAMPLERS,
        SearchSettings,
        SearchSummary,
        adapt_space,
        make_pruner,
        make_sampler,
        reconcile_dead_trials,
        resolve_space,
        run_search,
    )  # noqa: F401
    from automl_cxr.study._space import ParamSpec, SearchSpace, load_space  # noqa: F401
    from automl_cxr.study._storage import load_study, open_storage, storage_url, study_names  # noqa: F401
