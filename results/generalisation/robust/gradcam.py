"""What the model looks at: Grad-CAM of the best `roi=full` and the best `roi=lung_crop` (or
`lung_mask`) trial of the robust_site study on a few external images (held-out Cohen sites and
NIH patients), each model retrained on its full training data as `export` does.

Usage: python results/generalisation/robust/gradcam.py [DATA_DIR]   (default data/generalisation)
Writes gradcam.png beside this file (rows: images; columns: film, full, crop/mask model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from automl_cxr.data import decode_gray  # noqa: E402
from automl_cxr.deploy import open_trial, training_data  # noqa: E402
from automl_cxr.deploy._gradcam import gradcam_map, gradcam_overlay  # noqa: E402
from automl_cxr.engine import fit_full  # noqa: E402
from automl_cxr.lungs import Preprocessed, preprocess_for  # noqa: E402
from automl_cxr.study import load_study  # noqa: E402

HERE = Path(__file__).resolve().parent
EXT = HERE.parent / "external"


def best_with(study, roi: set[str]) -> int | None:
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.params.get("roi", "full") in roi
    ]
    return max(done, key=lambda t: t.value).number if done else None


def model_for(db: Path, number: int, data_dir: Path):
    spec = open_trial(db, trial=number)
    ds = training_data(spec, data_dir)
    model = fit_full(ds, spec.model, spec.train).eval()
    _, pre = preprocess_for(spec.train, data_dir)
    return (Preprocessed(pre, model) if pre is not None else model), spec


def main(argv: list[str]) -> int:
    data_dir = Path(argv[0]) if argv else Path("data/generalisation")
    db = HERE / "robust_site.db"
    study = load_study(str(db))
    picks = {
        "full": best_with(study, {"full"}),
        "lungs": best_with(study, {"lung_crop", "lung_mask"}),
    }
    if None in picks.values():
        print(f"need COMPLETE trials with roi=full and with a lung roi, got {picks}")
        return 1
    models = {k: model_for(db, n, data_dir) for k, n in picks.items()}
    cohen = pd.read_csv(EXT / "cohen_sites_binary.csv")
    nih = pd.read_csv(EXT / "nih_holdout_binary.csv")
    rows = pd.concat([cohen[cohen.label == "covid"].head(3), nih.head(2)])
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)))
    for r, (_, row) in enumerate(rows.iterrows()):
        px = decode_gray(row.path).pixels
        axes[r, 0].imshow(px, cmap="gray")
        axes[r, 0].set_title(f"{row.label} · {row.site}"[:40], fontsize=8)
        for c, key in enumerate(("full", "lungs"), start=1):
            model, spec = models[key]
            heat = gradcam_map(model, px, spec.resolution)
            axes[r, c].imshow(gradcam_overlay(px, heat))
            p = spec.model.to_dict()
            axes[r, c].set_title(
                f"trial {picks[key]} roi={spec.train.roi} {p['backbone'][:18]}", fontsize=8
            )
        for a in axes[r]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(HERE / "gradcam.png", dpi=80)
    print(f"wrote {HERE / 'gradcam.png'} (trials {picks})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
