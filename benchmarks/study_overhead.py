"""Per-trial overhead outside training, on SQLite.

    python benchmarks/study_overhead.py [--trials 50] [--json]
    python benchmarks/study_overhead.py --real [--trials 30] [--dataset four_class]
        [--workers N] [--json]

Default (bookkeeping only): one real smoke trial is trained once to get a full-size record;
then N trials run through the same sampler (TPE, worker tagging), the same search space
sampling and the same `record()` of all user attributes, with the training replaced by that
stored result.

`--real`: N real trials of `automl-cxr search` itself (`run_search`: the default `cpu` profile,
its two worker processes on SQLite, sampler, callbacks, objective, OOF artifact, user
attributes), head-only (every stage frozen) so that training is short, with `--pruner none`
so that every trial completes and is measured (pruning runs inside the fit). Each worker's
first trial of each backbone (features computed or loaded) is left out. Per trial:
`overhead` = its wall time in the study minus the time its folds spent fitting (`timing.fit`:
training steps and per-epoch evaluation), split into setup (model, images, cached features),
the rest of `run_trial` (summaries, ROC, latency) and what happens outside it (sampling, OOF
artifact, user attributes); `between` = from its end to the start of that worker's next trial
(tell, callbacks, the next trial's creation); `overhead_to_next` = the two together. Target:
at most 0.2 s per trial.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import optuna

from automl_cxr.data import load_dataset
from automl_cxr.engine import FeatureCache, run_trial
from automl_cxr.settings import resolve_data_dir
from automl_cxr.study import Objective, get_profile, load_space, open_storage, subsample
from automl_cxr.study._optuna import WorkerTaggingSampler, make_pruner, make_sampler


def real_overhead(args) -> dict:
    """Overhead of real head-only trials of `automl-cxr search` (see the module doc)."""
    import numpy as np

    from automl_cxr.study import SearchSettings, adapt_space, run_search
    from automl_cxr.study._profiles import profile_workers
    from automl_cxr.study._space import ParamSpec, builtin_space

    profile = get_profile("cpu")
    space = adapt_space(builtin_space("cpu.yaml"), profile)
    space.frozen_fraction = ParamSpec("frozen_fraction", "fixed", value=1.0)
    warm = len(space.backbones or profile.backbones)
    with tempfile.TemporaryDirectory() as tmp:
        settings = SearchSettings(
            dataset=args.dataset,
            trials=args.trials + warm,
            data_dir=resolve_data_dir(args.data_dir),
            storage=str(Path(tmp) / "overhead.db"),
            study_name="overhead",
            space=space,
            profile="cpu",
            pruner="none",  # every trial completes and is measured; pruning runs inside fit
            **({"workers": args.workers} if args.workers else {}),
        )
        t0 = time.perf_counter()
        run_search(settings)
        wall = time.perf_counter() - t0
        study = optuna.load_study(study_name="overhead", storage=open_storage(settings.storage))
        trials = study.get_trials(deepcopy=False)
    by_worker: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.datetime_start):
        by_worker.setdefault(str((t.user_attrs.get("process") or {}).get("id")), []).append(t)
    rows, between = [], []
    for seq in by_worker.values():
        backbones_seen: set[str] = set()
        for t, nxt in itertools.pairwise(seq):
            bb = (t.user_attrs.get("config") or {}).get("model", {}).get("backbone")
            first = bb not in backbones_seen  # this worker's first trial of a backbone: warm-up
            backbones_seen.add(bb)
            wall_t = (t.datetime_complete - t.datetime_start).total_seconds()
            gap = (nxt.datetime_start - t.datetime_start).total_seconds()
            if not first:  # pruned trials too: the time from one trial's end to the next start
                between.append(gap - wall_t)
            if first or t.state.name != "COMPLETE" or "timing" not in t.user_attrs:
                continue
            tm = t.user_attrs["timing"]
            rows.append(
                {
                    "fit": tm["fit"],
                    "setup": tm["setup"],
                    "rest": tm["rest"],
                    "outside": wall_t - tm["total"],
                    "between": gap - wall_t,
                    "overhead": wall_t - tm["fit"],
                    "overhead_to_next": gap - tm["fit"],
                }
            )
    if not rows:
        raise SystemExit("no complete trial after the warm-up: raise --trials")
    med = {k: round(float(np.median([r[k] for r in rows])), 4) for k in rows[0]}
    return {
        "command": f"python benchmarks/study_overhead.py --real --trials {args.trials}",
        "mode": "real head-only trials through run_search (the CLI's path), cpu profile",
        "dataset": args.dataset,
        "workers": settings.workers or profile_workers(profile),  # what run_search used
        "search_seconds": round(wall, 1),
        "trials_measured": len(rows),
        "median_seconds": med,
        "between_trials_all_states": {
            "trials": len(between),
            "median_seconds": round(float(np.median(between)), 4),
        },
        "target_seconds_per_trial": 0.2,
        "storage": "sqlite",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--real", action="store_true", help="real head-only trials (see above)")
    ap.add_argument("--dataset", default="four_class", help="with --real")
    ap.add_argument("--workers", type=int, default=None, help="with --real (default: the search's)")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.real:
        out = real_overhead(args)
        print(json.dumps(out, indent=2) if args.json else json.dumps(out))
        return 0
    profile = get_profile("smoke")
    ds = subsample(load_dataset("three_class", resolve_data_dir(args.data_dir)), 40, 0)
    obj = Objective(ds, load_space(None), profile, feature_cache=FeatureCache())
    probe = optuna.create_study()
    plan = obj.sample(probe.ask())
    result = run_trial(ds, plan.model, plan.train)

    def trivial(trial: optuna.Trial) -> float:
        p = obj.sample(trial)
        trial.set_user_attr("config", {"model": p.model.to_dict(), "train": p.train.to_dict()})
        for step, point in enumerate(c for curve in result.curves for c in curve):
            trial.report(point["value"], step)
        obj.record(trial, result)
        return result.value

    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(Path(tmp) / "overhead.db")
        study = optuna.create_study(
            storage=storage,
            sampler=WorkerTaggingSampler(make_sampler("tpe", 0, multi=False)),
            pruner=make_pruner("hyperband", profile.epochs * profile.n_folds),
            direction="maximize",
        )
        t0 = time.perf_counter()
        study.optimize(trivial, n_trials=args.trials)
        per_trial = (time.perf_counter() - t0) / args.trials
        attrs_bytes = len(json.dumps(study.trials[-1].user_attrs))
    out = {
        "command": f"python benchmarks/study_overhead.py --trials {args.trials}",
        "trials": args.trials,
        "seconds_per_trial": round(per_trial, 4),
        "target_seconds_per_trial": 0.2,
        "user_attrs_bytes_per_trial": attrs_bytes,
        "storage": "sqlite",
    }
    print(
        json.dumps(out, indent=2)
        if args.json
        else "\n".join(f"{k:28s} {v}" for k, v in out.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
