"""Would another site-held-out estimate see what the held-out hospitals see? (ROBUST.md §9)

On the frozen pooled features of `feature_probe.py` (the same 96 configurations: 4 backbone x
size pairs, avg or avg+max pooling, 3 erasure depths, 4 regularisation strengths), each
configuration is scored by

- `site_cv`: the search's estimate (mean over its 3 site folds, seed 0);
- `site_pooled`: one balanced accuracy over the same folds' pooled out-of-fold predictions;
- `anchK_sS`: anchored and pooled — NIH (the only non-COVID site of any size) always trains and
  the Cohen sites rotate through K site-grouped folds (seed S), so every fold holds both
  classes and the estimate is of Cohen films from hospitals the model never saw, which is what
  `cohen_sites` measures;

and once on `cohen_sites` and `nih_holdout`. For each estimate: its correlation with
`cohen_sites` over the 96 configurations and the configuration it would pick. Nothing is chosen
on the external sets.

Usage: python results/generalisation/robust/estimator_probe.py [DATA_DIR]
Writes estimator_probe.json and estimator_probe.md beside this file.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from feature_probe import C_GRID, CONFIGS, ERASE, _features, _fit_predict, anchored_folds
from probe_data import external_sets
from sklearn.metrics import balanced_accuracy_score

from automl_cxr.data import load_dataset
from automl_cxr.engine import make_site_splits

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    train = load_dataset("binary_adult", data_dir)
    cohen, nih = external_sets(train, data_dir)
    y = np.asarray(train.labels)
    site = train.manifest["site"].to_numpy().astype(str)
    patient = train.manifest["patient_id"].to_numpy().astype(str)
    folds, _ = make_site_splits(y, patient, site, n_folds=3, seed=0)
    schemes = {f"anch{k}_s{s}": anchored_folds(y, site, k, s) for k in (5, 10) for s in (0, 1)}
    rows = []
    for backbone, size in CONFIGS:
        t0 = time.perf_counter()
        f = _features(backbone, size, {"train": train, "cohen": cohen, "nih": nih})
        print(f"{backbone} {size}px features in {time.perf_counter() - t0:.0f} s", flush=True)
        half = f["train"].shape[1] // 2
        for pool in ("avg", "avgmax"):
            x, xc, xn = (
                f[k] if pool == "avgmax" else f[k][:, :half] for k in ("train", "cohen", "nih")
            )
            for k in ERASE:
                for c in C_GRID:
                    r = {"backbone": backbone, "size": size, "pool": pool, "erase_k": k, "C": c}
                    oof, cv = np.full(len(y), -1), []
                    for s in folds:
                        p = _fit_predict(x[s.train], y[s.train], site[s.train], [x[s.val]], c, k)
                        cv.append(balanced_accuracy_score(y[s.val], p[0]))
                        oof[s.val] = p[0]
                    r["site_cv"] = float(np.mean(cv))
                    r["site_pooled"] = float(balanced_accuracy_score(y, oof))
                    for name, scheme in schemes.items():
                        idx = np.concatenate([va for _, va in scheme])
                        pred = np.concatenate(
                            [
                                _fit_predict(x[tr], y[tr], site[tr], [x[va]], c, k)[0]
                                for tr, va in scheme
                            ]
                        )
                        r[name] = float(balanced_accuracy_score(y[idx], pred))
                    pc, pn = _fit_predict(x, y, site, [xc, xn], c, k)
                    r["cohen_sites"] = float(balanced_accuracy_score(cohen.labels, pc))
                    r["nih_spec"] = float(np.mean(pn == 1))
                    rows.append(r)
    (HERE / "estimator_probe.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(summarise(rows))
    return 0


def summarise(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k == "site_cv" or k == "site_pooled" or k.startswith("anch")]
    cs = np.array([r["cohen_sites"] for r in rows])
    lines = [
        f"Over {len(rows)} configurations of frozen pooled features:",
        "",
        "| estimate | corr. with cohen_sites | picks | its estimate | its cohen_sites "
        "| NIH spec. |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for key in keys:
        v = np.array([r[key] for r in rows])
        b = rows[int(np.argmax(v))]
        pick = f"{b['backbone']} {b['size']} px, {b['pool']}, erase {b['erase_k']}, C {b['C']}"
        lines.append(
            f"| {key} | {np.corrcoef(v, cs)[0, 1]:+.2f} | {pick} | {b[key]:.3f} | "
            f"{b['cohen_sites']:.3f} | {b['nih_spec']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "estimator_probe.md").write_text(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
