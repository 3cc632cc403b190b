"""Two single-thread trials side by side against one two-thread trial after another.

    python benchmarks/parallel_trials.py [--dataset four_class] [--json]

The `cpu` profile runs `--workers 2` with one thread each on a 2-core machine; this measures
why. For each of two typical `cpu`-profile trials (MobileNet v2 with 7 of 8 stages frozen and
a linear head, on cached stage-7 features; and a head-only MLP on cached pooled vectors), it
times the same pair of trials (two learning rates) run

- sequentially in one process with `cpu_count` threads, and
- at once in two processes with `cpu_count // 2` threads each (started and warmed up before
  the clock starts, as a search's workers are),

with the frozen features computed beforehand into a shared folder (as the workers share it).
`speedup` = sequential wall / parallel wall (> 1: side by side is faster).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "partial_7of8_linear": {"frozen_stages": 7, "head": "linear", "head_kwargs": {"pool": "avg"}},
    "head_only_mlp512": {
        "frozen_stages": 8,
        "head": "mlp",
        "head_kwargs": {"pool": "avgmax", "hidden": 512},
    },
}
LRS = (1e-3, 3e-3)


def _trial(data_dir: str, dataset: str, cache_dir: str, name: str, lr: float) -> float:
    from automl_cxr.data import load_dataset
    from automl_cxr.engine import FeatureCache, TrainConfig, run_trial
    from automl_cxr.models import ModelConfig

    ds = load_dataset(dataset, Path(data_dir))
    mc = ModelConfig("mobilenetv2_100", num_classes=len(ds.classes), **CONFIGS[name])
    tc = TrainConfig(
        resolution=128, epochs=6, n_folds=3, batch_size=32, early_stopping=3, lr=lr, seed=0
    )
    t0 = time.perf_counter()
    run_trial(ds, mc, tc, feature_cache=FeatureCache(directory=cache_dir))
    return time.perf_counter() - t0


def _worker(threads: int, args: tuple, ready, go, out) -> None:
    import torch

    torch.set_num_threads(threads)
    _trial(*args[:-1], lr=args[-1])  # warm-up: imports, kernels, the feature file read once
    ready.put(1)
    go.wait()
    t0 = time.perf_counter()
    _trial(*args[:-1], lr=args[-1])
    out.put(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="four_class")
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    cores = os.cpu_count() or 1
    out: dict = {
        "command": "python benchmarks/parallel_trials.py",
        "machine": f"{platform.machine()} {cores} cores, {platform.processor() or ''}",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in CONFIGS:
            torch.set_num_threads(cores)
            base = (str(args.data_dir), args.dataset, cache_dir, name)
            _trial(*base, lr=LRS[0])  # features into the folder, and this process warmed up
            t0 = time.perf_counter()
            for lr in LRS:
                _trial(*base, lr=lr)
            sequential = time.perf_counter() - t0
            ctx = mp.get_context("spawn")
            ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
            procs = [
                ctx.Process(
                    target=_worker, args=(max(1, cores // 2), (*base, lr), ready, go, results)
                )
                for lr in LRS
            ]
            for p in procs:
                p.start()
            for _ in procs:
                ready.get()
            t0 = time.perf_counter()
            go.set()
            per_trial = [results.get() for _ in procs]
            parallel = time.perf_counter() - t0
            for p in procs:
                p.join()
            out[name] = {
                "sequential_seconds": round(sequential, 2),
                "sequential_threads": cores,
                "parallel_seconds": round(parallel, 2),
                "parallel_threads_each": max(1, cores // 2),
                "parallel_per_trial_seconds": [round(s, 2) for s in per_trial],
                "speedup": round(sequential / parallel, 3),
            }
    print(json.dumps(out, indent=2) if args.json else json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
