"""Studies: search spaces, profiles, the Optuna objective, and the runners (local / Ray Tune)."""

from __future__ import annotations

from automl_cxr.study._objective import OBJECTIVE_KEYS, Objective, TrialPlan, json_safe, subsample
from automl_cxr.study._profiles import Profile, default_profile, get_profile, list_profiles
from automl_cxr.study._runner import (
    FINISHED,
    PRUNERS,
    SAMPLERS,
    SearchSettings,
    SearchSummary,
    make_pruner,
    make_sampler,
    reconcile_dead_trials,
    run_search,
)
from automl_cxr.study._space import ParamSpec, SearchSpace, load_space
from automl_cxr.study._storage import open_storage, storage_url, study_names

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
    "default_profile",
    "get_profile",
    "json_safe",
    "list_profiles",
    "load_space",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "reconcile_dead_trials",
    "run_search",
    "storage_url",
    "study_names",
    "subsample",
]
