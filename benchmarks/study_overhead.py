"""Study bookkeeping per trial (sampling, storage writes, user attributes) on SQLite.

    python benchmarks/study_overhead.py [--trials 50] [--json]

One real smoke trial is trained once to get a full-size record; then N trials run through the
same sampler (TPE, worker tagging), the same search space sampling and the same `record()` of
all user attributes, with the training replaced by that stored result. The time per trial is
the bookkeeping cost a real search pays on top of training. Target: at most 0.2 s per trial.
"""

from __future__ import annotations

import argparse
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
from automl_cxr.study._runner import WorkerTaggingSampler, make_pruner, make_sampler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
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
