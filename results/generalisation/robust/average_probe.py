"""Weight averaging and float order: do a trial's figures hold when it is trained again?

The best trial of five site-CV studies (ROBUST.md §1-§6) trained again with its recorded
configuration (`run_trial`, the search's own folds) under

- `weight_average` 0 (the weights as trained) or 0.9 / 0.98 (an exponential moving average of
  the weights, evaluated, early-stopped on and kept: `automl_cxr.engine.WeightAverage`; Cha et
  al. 2021 "SWAD" found averaged weights generalise better to unseen domains);
- 1 or 2 torch threads (the same arithmetic summed in another order);
- seeds 0 (the search's), 1, 2;
- the profile's precision (bfloat16 autocast of the trained part on a CPU that computes it
  natively, as on this machine and in the searches) or, with `--fp32`, float32,

each scored by its site-CV fold mean and on `cohen_sites` (24 Cohen hospitals no training image
comes from) and `nih_holdout` (new NIH patients: specificity). Nothing is chosen on the external
sets. Resumable: rows already in the JSON are skipped.

Usage: python results/generalisation/robust/average_probe.py [DATA_DIR]
       [--decays 0,0.9,0.98] [--threads 1,2] [--seeds 0] [--fp32]
Writes average_probe.json and average_probe.md beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch
from probe_data import external_sets

from automl_cxr.deploy._select import training_data, trial_spec
from automl_cxr.engine import run_precision, run_trial
from automl_cxr.study import external_attr_key

HERE = Path(__file__).resolve().parent
TRIALS = (
    ("none_rerun_site", 3),
    ("dro_site", 21),
    ("lite2_site", 9),
    ("resolution_site", 19),
    ("robust_dro_site", 23),
)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def run(data_dir: Path, decays, threads, seeds, out: Path, fp32: bool = False) -> list[dict]:
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["study"], r["decay"], r["threads"], r["seed"], r["precision"]) for r in rows}
    for study, number in TRIALS:
        st = optuna.load_study(study_name=None, storage=f"sqlite:///{HERE / study}.db")
        spec = trial_spec(st, st.trials[number])
        ds = training_data(spec, data_dir)
        cohen, nih = external_sets(ds, data_dir)
        for seed in seeds:
            for th in threads:
                for d in decays:
                    cfg = dataclasses.replace(spec.train, weight_average=d, seed=seed)
                    if fp32:
                        cfg = dataclasses.replace(cfg, cpu_amp=False)
                    if (
                        study,
                        d,
                        th,
                        seed,
                        run_precision(cfg.device, cpu_amp=cfg.cpu_amp, amp=cfg.amp),
                    ) in done:
                        continue
                    torch.set_num_threads(th)
                    t0 = time.time()
                    r = run_trial(ds, spec.model, cfg, externals=[cohen, nih])
                    e = r.externals
                    row = {
                        "study": study,
                        "trial": number,
                        "decay": d,
                        "threads": th,
                        "seed": seed,
                        "precision": r.precision,
                        "cv": float(r.summary["metrics"]["balanced_accuracy"]["mean"]),
                        "folds": [round(f["balanced_accuracy"], 4) for f in r.folds],
                        "cohen": float(e[cohen.name]["metrics"]["balanced_accuracy"]),
                        "cohen_auc": float(e[cohen.name]["metrics"].get("auc", float("nan"))),
                        "nih": float(e[nih.name]["metrics"]["balanced_accuracy"]),
                        "s": round(time.time() - t0, 1),
                    }
                    rows.append(row)
                    out.write_text(json.dumps(rows, indent=1) + "\n")
                    print(row, flush=True)
    return rows


def _recorded(study: str, number: int) -> tuple[list[float], float, float, str]:
    t = optuna.load_study(study_name=None, storage=f"sqlite:///{HERE / study}.db").trials[number]
    folds = [round(f["balanced_accuracy"], 4) for f in t.user_attrs["metrics"]["folds"]]
    ck = t.user_attrs.get(external_attr_key("cohen_sites_binary", "balanced_accuracy"))
    frozen = float(t.params.get("frozen_fraction", float("nan")))
    return folds, frozen, float(ck), str(t.user_attrs.get("precision"))


def summarise(rows: list[dict]) -> str:
    runs = [("bf16", 1), ("bf16", 2), ("fp32", 1), ("fp32", 2)]
    lines = [
        "Float order: the search's figures (its recorded precision) against the same trial "
        "trained again (seed 0, `weight_average` 0), by precision and thread count.",
        "",
        "| study | trial | frozen | search: precision, folds / cohen_sites | "
        + " | ".join(f"{p}, {t} thread{'s' if t > 1 else ''}" for p, t in runs)
        + " |",
        "| --- | ---: | ---: | --- |" + " --- |" * len(runs),
    ]
    for study, number in TRIALS:
        folds, frozen, ck, precision = _recorded(study, number)
        cell = {
            (r["precision"], r["threads"]): f"{r['folds']} / {r['cohen']:.3f}"
            for r in rows
            if r["study"] == study and r["decay"] == 0 and r["seed"] == 0
        }
        lines.append(
            f"| {study} | {number} | {frozen:.3f} | {precision}, {folds} / {ck:.3f} | "
            + " | ".join(cell.get(k, "-") for k in runs)
            + " |"
        )
    rows = [r for r in rows if r["precision"] == "bf16"]  # the weight-average runs
    lines += [
        "",
        "Weight averaging against the weights as trained, paired on (trial, threads, seed): "
        "mean difference over the pairs.",
        "",
        "| study | trial | decay | pairs | Δ site CV | Δ cohen_sites | Δ cohen_sites AUC | "
        "Δ NIH spec. |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {(r["study"], r["threads"], r["seed"]): r for r in rows if r["decay"] == 0}
    for study, number in TRIALS:
        for d in sorted({r["decay"] for r in rows} - {0}):
            pairs = [
                (r, base[(study, r["threads"], r["seed"])])
                for r in rows
                if r["study"] == study
                and r["decay"] == d
                and (study, r["threads"], r["seed"]) in base
            ]
            if not pairs:
                continue
            m = {
                k: np.mean([a[k] - b[k] for a, b in pairs])
                for k in ("cv", "cohen", "cohen_auc", "nih")
            }
            lines.append(
                f"| {study} | {number} | {d:g} | {len(pairs)} | {m['cv']:+.3f} | "
                f"{m['cohen']:+.3f} | {m['cohen_auc']:+.3f} | {m['nih']:+.3f} |"
            )
    lines += [
        "",
        "Seeds (1 thread, `weight_average` 0): the same trial's site CV and cohen_sites per seed.",
        "",
        "| study | trial | seeds | site CV | cohen_sites |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for study, number in TRIALS:
        sel = sorted(
            (r for r in rows if r["study"] == study and r["decay"] == 0 and r["threads"] == 1),
            key=lambda r: r["seed"],
        )
        seeds = ", ".join(str(r["seed"]) for r in sel)
        cv = ", ".join(f"{r['cv']:.3f}" for r in sel)
        cohen = ", ".join(f"{r['cohen']:.3f}" for r in sel)
        lines.append(f"| {study} | {number} | {seeds} | {cv} | {cohen} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", nargs="?", default="data/generalisation", type=Path)
    ap.add_argument("--decays", default="0,0.9,0.98", type=_floats)
    ap.add_argument("--threads", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--fp32", action="store_true", help="train in float32 (cpu_amp off)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = HERE / "average_probe.json"
    rows = run(args.data_dir, args.decays, args.threads, args.seeds, out, args.fp32)
    text = summarise(rows)
    (HERE / "average_probe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
