"""bfloat16 on the CPU: speed and accuracy of `cpu_amp` against float32, on the same trials.

    python benchmarks/cpu_precision.py [--dataset four_class] [--n 6] [--backbone mobilenetv2_100]
        [--data-dir DIR] [--json]

Draws `--n` configurations of the `cpu` profile's space (`cpu.yaml`, one backbone) with a
seeded random sampler (no selection by result) and trains each one three times, with the
profile's protocol (128 px, 3 patient-grouped folds, 6 epochs, early stopping):

- `fp32`: float32 throughout (`cpu_amp=False`);
- `bf16`: what the `cpu` profile does (`cpu_amp=True`): the trained stages and the head under
  bfloat16 autocast, the cached frozen features float32;
- `bf16_features`: bf16 also for computing the cached frozen features (what `cpu_amp` did
  at first; kept here to show why it no longer does).

Prints per configuration the balanced accuracy (mean over folds) and the fit time of each,
then the mean difference to fp32 and the fit-time ratio. Feature caches are warmed before
timing. Needs a CPU with native bf16 (AVX512-BF16 or AMX); elsewhere `cpu_amp` changes
nothing and the script says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import optuna

from automl_cxr.data import load_dataset
from automl_cxr.engine import FeatureCache, cpu_bf16_supported, run_trial
from automl_cxr.settings import resolve_data_dir
from automl_cxr.study import Objective, adapt_space, get_profile, resolve_space

MODES = ("fp32", "bf16", "bf16_features")


def _configs(ds, backbone: str, n: int, seed: int) -> list:
    profile = get_profile("cpu")
    space = adapt_space(resolve_space(None, profile), profile)
    space.backbones = [backbone]
    objective = Objective(ds, space, profile, seed=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [objective.sample(study.ask()) for _ in range(n)]


def _run(ds, plan, mode: str, cache: FeatureCache):
    import automl_cxr.engine._session as trial_mod

    train = dataclasses.replace(plan.train, cpu_amp=mode != "fp32")
    original = trial_mod.Session.feature_amp
    if mode == "bf16_features":  # the first version: features under autocast as well
        trial_mod.Session.feature_amp = property(lambda self: self.use_amp)
    try:
        run_trial(ds, plan.model, train, feature_cache=cache)  # features cached, kernels warm
        t0 = time.perf_counter()
        result = run_trial(ds, plan.model, train, feature_cache=cache)
        return result, time.perf_counter() - t0
    finally:
        trial_mod.Session.feature_amp = original


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="four_class")
    ap.add_argument("--backbone", default="mobilenetv2_100")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if not cpu_bf16_supported():
        print("this CPU has no native bfloat16: cpu_amp changes nothing here", file=sys.stderr)
        return 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ds = load_dataset(args.dataset, resolve_data_dir(args.data_dir))
    cache = FeatureCache()
    rows = []
    for i, plan in enumerate(_configs(ds, args.backbone, args.n, args.seed)):
        row: dict = {
            "frozen_stages": plan.model.frozen_stages,
            "head": plan.model.head,
            "head_kwargs": plan.model.head_kwargs,
            "lr": plan.train.lr,
            "optimizer": plan.train.optimizer,
        }
        for mode in MODES:
            result, wall = _run(ds, plan, mode, cache)
            row[mode] = {
                "value": round(result.value, 4),
                "fit_seconds": result.timing["fit"],
                "wall_seconds": round(wall, 2),
                "precision": result.precision,
            }
        rows.append(row)
        print(
            f"config {i}: frozen {row['frozen_stages']} {row['head']} lr {row['lr']:.2g} "
            + " ".join(f"{m} {row[m]['value']:.4f} ({row[m]['fit_seconds']:.1f} s)" for m in MODES),
            file=sys.stderr,
            flush=True,
        )

    def mean(xs):
        return round(sum(xs) / len(xs), 4)

    summary = {
        m: {
            "mean_value_minus_fp32": mean([r[m]["value"] - r["fp32"]["value"] for r in rows]),
            "lower_than_fp32": sum(r[m]["value"] < r["fp32"]["value"] for r in rows),
            "fit_time_ratio_to_fp32": round(
                sum(r[m]["fit_seconds"] for r in rows)
                / sum(r["fp32"]["fit_seconds"] for r in rows),
                3,
            ),
        }
        for m in MODES[1:]
    }
    out = {
        "command": "python benchmarks/cpu_precision.py "
        f"--dataset {args.dataset} --backbone {args.backbone} --n {args.n} --seed {args.seed}",
        "machine": f"{platform.machine()} {os.cpu_count()} cores {platform.processor() or ''}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "configs": rows,
        "summary": summary,
    }
    print(json.dumps(out, indent=2) if args.json else json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
