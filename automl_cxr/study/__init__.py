"""Studies: search spaces, profiles, the Optuna objective, and the backends (local / Ray Tune).

Layout (imports go one way, top to bottom; no cycles):
  _record, _space, _profiles      plain pieces (Optuna's private API: automl_cxr/_compat only)
  _recovery   dead/failed trials: worker identity, FAIL + re-run, abort on repeated failures
  _optuna     shared Optuna pieces: FINISHED, sampler/pruner factories, seeds, worker tagging
  _settings   SearchSettings (validated) and SearchSummary
  _testsplit, _external, _protocol   the data a search sees: its test split, external sets,
              and the evaluation protocol stored with the study
  _objective  the objective (sample a configuration, run the engine, record the trial)
  _setup      the space for a profile; the study created (settings stored) or resumed (checked)
  _local      the local backend: this process, or N worker processes on one storage
  _coordinate with N local workers, the stages before the trials in a child process, so the
              coordinating one never imports torch
  _ray/       `--backend ray`: one trial on a worker, the Tune schedulers, the ask/tell
              searcher, the Tune run
  _runner     run_search: settings → space → data → protocol → external sets → study →
              backend → summary, each stage entered once
"""

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
    "FINISHED": "automl_cxr.study._optuna",
    "adapt_space": "automl_cxr.study._setup",
    "PRUNERS": "automl_cxr.study._optuna",
    "SAMPLERS": "automl_cxr.study._optuna",
    "SearchSettings": "automl_cxr.study._settings",
    "SearchSummary": "automl_cxr.study._settings",
    "make_pruner": "automl_cxr.study._optuna",
    "make_sampler": "automl_cxr.study._optuna",
    "reconcile_dead_trials": "automl_cxr.study._recovery",
    "run_search": "automl_cxr.study._runner",
    "resolve_space": "automl_cxr.study._setup",
    "ParamSpec": "automl_cxr.study._space",
    "SearchSpace": "automl_cxr.study._space",
    "load_space": "automl_cxr.study._space",
    "builtin_space": "automl_cxr.study._space",
    "describe_held": "automl_cxr.study._testsplit",
    "search_data": "automl_cxr.study._testsplit",
    "fold_members": "automl_cxr.study._protocol",
    "external_attr_key": "automl_cxr.study._external",
    "prepare_externals": "automl_cxr.study._external",
    "load_study": "automl_cxr._storage",
    "open_storage": "automl_cxr._storage",
    "storage_location": "automl_cxr._storage",
    "storage_url": "automl_cxr._storage",
    "study_names": "automl_cxr._storage",
}

__all__ = [
    "describe_held",
    "external_attr_key",
    "prepare_externals",
    "fold_members",
    "search_data",
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
    "builtin_space",
    "load_study",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "reconcile_dead_trials",
    "resolve_space",
    "run_search",
    "storage_location",
    "storage_url",
    "study_names",
    "subsample",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from automl_cxr._storage import (  # noqa: F401
        load_study,
        open_storage,
        storage_location,
        storage_url,
        study_names,
    )
    from automl_cxr.study._external import external_attr_key, prepare_externals  # noqa: F401
    from automl_cxr.study._objective import (
        OBJECTIVE_KEYS,
        Objective,
        TrialPlan,
        json_safe,
        subsample,
    )  # noqa: F401
    from automl_cxr.study._optuna import (  # noqa: F401
        FINISHED,
        PRUNERS,
        SAMPLERS,
        make_pruner,
        make_sampler,
    )
    from automl_cxr.study._profiles import Profile, default_profile, get_profile, list_profiles  # noqa: F401
    from automl_cxr.study._protocol import fold_members  # noqa: F401
    from automl_cxr.study._recovery import reconcile_dead_trials  # noqa: F401
    from automl_cxr.study._runner import run_search  # noqa: F401
    from automl_cxr.study._settings import SearchSettings, SearchSummary  # noqa: F401
    from automl_cxr.study._setup import adapt_space, resolve_space  # noqa: F401
    from automl_cxr.study._space import (  # noqa: F401
        ParamSpec,
        SearchSpace,
        builtin_space,
        load_space,
    )
    from automl_cxr.study._testsplit import describe_held, search_data  # noqa: F401
