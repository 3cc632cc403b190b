"""Search efficiency: our search against the naive way to do the same job, side by side.

    python benchmarks/search_speed.py [--dataset four_class] [--trials 200]
        [--naive-seconds 1200] [--ours-seconds 1800] [--profile cpu] [--out benchmarks/search_speed]

Both sides search the same space (the profile's default space) on the same data with the
same training code, one after the other in this process's machine:

- **ours**: `run_search` exactly as `automl-cxr search --dataset D --trials N` runs it (default
  workers, TPE as configured, Hyperband pruning, frozen/pooled feature caches), stopped after
  `--trials` finished trials or `--ours-seconds`;
- **naive**: plain `optuna.samplers.TPESampler(seed)` with no pruner, no feature cache (every
  trial computes its frozen stages from pixels in every epoch) and float32 throughout (no
  bfloat16 autocast), one trial at a time, for `--naive-seconds`.

For each side it records every finished trial (seconds since that side started, state, value)
and the best-so-far curve, then `time_to_naive_best` (when ours first reached the naive run's
final best) and `ratio` = that time / the naive run's wall time (the issue-14 goal: <= 0.2).
Writes `<out>.json` and `<out>.html` (Plotly: best-so-far against wall-clock, both sides).
`--quick` runs the smoke profile on a few images for seconds (what the test does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import optuna

from automl_cxr.data import load_dataset, prepare_recipes
from automl_cxr.settings import default_sources_dir
from automl_cxr.study import (
    Objective,
    SearchSettings,
    adapt_space,
    default_profile,
    get_profile,
    resolve_space,
    run_search,
    subsample,
)


def _dataset_ready(name: str, data_dir: Path) -> None:
    try:
        load_dataset(name, data_dir)
    except Exception:
        src = default_sources_dir()
        prepare_recipes(
            cohen=src / "cohen",
            kermany=src / "kermany",
            nih=(src / "nih") if (src / "nih").is_dir() else None,
            data_dir=data_dir,
            recipes=[name],
        )


def _curve(study: optuna.Study, start: float) -> dict:
    """Finished trials in completion order and the best-so-far curve of the COMPLETE ones."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and t.datetime_complete is not None:
            rows.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "seconds": round(t.datetime_complete.timestamp() - start, 3),
                    "value": t.value if t.state.name == "COMPLETE" else None,
                }
            )
    rows.sort(key=lambda r: r["seconds"])
    best, curve = None, []
    for r in rows:
        if r["value"] is not None and (best is None or r["value"] > best):
            best = r["value"]
            curve.append({"seconds": r["seconds"], "best": best, "trial": r["number"]})
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {"trials": rows, "best_curve": curve, "best": best, "counts": counts}


def run_ours(args, storage: str) -> dict:
    settings = SearchSettings(
        dataset=args.dataset,
        trials=args.trials,
        data_dir=args.data_dir,
        storage=storage,
        study_name="ours",
        profile=args.profile,
        timeout=args.ours_seconds,
        seed=args.seed,
        **({"workers": args.workers} if args.workers else {}),
    )
    start = time.time()
    summary = run_search(settings, on_trial=_progress("ours", start))
    wall = time.time() - start
    study = optuna.load_study(study_name="ours", storage=f"sqlite:///{storage}")
    try:
        best = study.best_trial
        best_trial = {
            "number": best.number,
            "params": best.params,
            "balanced_accuracy": best.user_attrs["metrics"]["summary"]["metrics"][
                "balanced_accuracy"
            ],  # mean over folds with its 95 % interval
        }
    except ValueError:  # no complete trial
        best_trial = None
    return {
        **_curve(study, start),
        "best_trial": best_trial,
        "wall_seconds": round(wall, 2),
        "workers": settings.workers,
        "summary_counts": summary.counts,
    }


class _NoCacheObjective(Objective):
    """Our objective with the frozen-feature cache and bfloat16 autocast switched off (the
    naive trial: plain float32 PyTorch, every epoch from pixels)."""

    def sample(self, trial: optuna.Trial):
        plan = super().sample(trial)
        train = dataclasses.replace(plan.train, feature_cache=False, cpu_amp=False)
        return dataclasses.replace(plan, train=train)


def run_naive(args, storage: str) -> dict:
    start = time.time()
    profile = get_profile(args.profile) if args.profile else default_profile()
    space = adapt_space(resolve_space(None, profile), profile)
    ds = subsample(load_dataset(args.dataset, args.data_dir), profile.max_per_class, args.seed)
    study = optuna.create_study(
        study_name="naive",
        storage=f"sqlite:///{storage}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
        pruner=optuna.pruners.NopPruner(),
    )
    study.optimize(
        _NoCacheObjective(ds, space, profile, seed=args.seed),
        n_trials=args.trials,
        timeout=args.naive_seconds,
        catch=(Exception,),
        callbacks=[_progress("naive", start)],
    )
    return {**_curve(study, start), "wall_seconds": round(time.time() - start, 2)}


def _progress(side: str, start: float):
    """A study callback printing each finished trial to stderr (long runs show progress)."""

    def show(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        print(
            f"[{side} {time.time() - start:7.1f} s] trial {trial.number} {trial.state.name} "
            f"{value}",
            file=sys.stderr,
            flush=True,
        )

    return show


def compare(ours: dict, naive: dict) -> dict:
    """When ours first reached the naive run's final best, and that as a share of its time."""
    target = naive["best"]
    if target is None:
        return {"naive_best": None, "time_to_naive_best": None, "ratio": None}
    reached = next((p["seconds"] for p in ours["best_curve"] if p["best"] >= target), None)
    return {
        "naive_best": target,
        "time_to_naive_best": reached,
        "ratio": None if reached is None else round(reached / naive["wall_seconds"], 4),
    }


def figure(result: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for side in ("ours", "naive"):
        curve = result[side]["best_curve"]
        xs = [p["seconds"] / 60 for p in curve] + [result[side]["wall_seconds"] / 60]
        ys = [p["best"] for p in curve] + ([curve[-1]["best"]] if curve else [])
        label = {"ours": "automl-cxr search", "naive": "plain TPE, no cache, no pruning"}[side]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", line_shape="hv", name=label)
    cmp_ = result["comparison"]
    if cmp_["time_to_naive_best"] is not None:
        fig.add_vline(x=cmp_["time_to_naive_best"] / 60, line_dash="dot")
    fig.update_layout(
        title=f"Best {result['metric']} so far against wall-clock time ({result['dataset']}, "
        f"{result['machine']['cpus']} CPUs)",
        xaxis_title="minutes since the search started",
        yaxis_title=f"best {result['metric']} (mean over folds)",
    )
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="four_class")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--profile", default=None, help="default: the machine's (cpu here)")
    ap.add_argument("--naive-seconds", type=float, default=1200.0)
    ap.add_argument("--ours-seconds", type=float, default=1800.0)
    ap.add_argument("--workers", type=int, default=None, help="default: the search's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/search_speed"))
    ap.add_argument("--quick", action="store_true", help="smoke profile, seconds (for tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.profile = "smoke"
        args.trials = min(args.trials, 6)
        args.naive_seconds = min(args.naive_seconds, 20.0)
        args.ours_seconds = min(args.ours_seconds, 60.0)
        args.dataset = "three_class" if args.dataset == "four_class" else args.dataset
    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = args.data_dir or Path(tmp) / "data"
        _dataset_ready(args.dataset, args.data_dir)
        ours = run_ours(args, str(Path(tmp) / "ours.db"))
        naive = run_naive(args, str(Path(tmp) / "naive.db"))
    import torch

    result = {
        "command": " ".join(
            ["python benchmarks/search_speed.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "dataset": args.dataset,
        "profile": args.profile or default_profile().name,
        "metric": "balanced_accuracy",
        "trials": args.trials,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "ours": ours,
        "naive": naive,
    }
    result["comparison"] = compare(ours, naive)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    figure(result).write_html(str(args.out.with_suffix(".html")), include_plotlyjs="cdn")
    c = result["comparison"]
    print(
        json.dumps(
            {
                "ours": {k: ours[k] for k in ("best", "counts", "wall_seconds")},
                "naive": {k: naive[k] for k in ("best", "counts", "wall_seconds")},
                **c,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
