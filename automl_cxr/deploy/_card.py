"""The model card: what the exported model is, what it was trained on, how well the
configuration scored (with intervals), what may be wrong with it, and what it is not for."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from automl_cxr._numbers import clip01, finite_or_none
from automl_cxr.data import PreparedDataset
from automl_cxr.engine import CV_FOLDS, SCALAR_METRICS

__all__ = ["CARD_METRICS", "INPUT_CONTRACT", "INTENDED_USE", "build_card"]

INTENDED_USE = (
    "RESEARCH USE ONLY. This model is not a medical device: it is not cleared or approved by "
    "any regulator, has not been validated clinically, and must not be used to diagnose, "
    "triage, screen or treat patients, nor to support any clinical decision."
)

INPUT_CONTRACT = {
    "shape": "(B, 1, R, R)",
    "dtype": "float32",
    "range": "[0, 1]",
    "description": (
        "Grayscale radiographs as float32 tensors of shape (B, 1, R, R) with values in [0, 1] "
        "(8-bit gray value / 255), R = the model's resolution. Decode as the data layer does "
        "(any format → 8-bit gray, 16-bit rescaled by its range, alpha over black), resize the "
        "whole image to R x R with bilinear antialiasing (aspect ratio not kept, no crop). "
        "Normalisation happens inside the model. Output: logits (B, C) in the order of "
        "`classes`; softmax gives probabilities."
    ),
}

CARD_METRICS = SCALAR_METRICS

_NOT_THIS_MODEL = (
    "not of this exact model (retrained on all of the data; or, for a fold ensemble, whose "
    "members were each scored only on their own held-out fold)"
)
_CV_LIMITATION = {
    "patient": "Metrics are patient-grouped cross-validation estimates of the *configuration* "
    f"on the study's data, {_NOT_THIS_MODEL}, and not of performance on other hospitals, "
    "scanners or populations.",
    "site": "Metrics are site-held-out cross-validation estimates of the *configuration*: each "
    "fold scored hospitals of the study's own sources that it did not train on. They are "
    f"{_NOT_THIS_MODEL}, and they describe new hospitals only as far as the study's sources "
    "resemble them (other scanners, populations and case mixes can do worse).",
}
_CV_NOTE = {
    "patient": "",
    "site": " (each fold validates on whole acquisition sites it does not train on, sites "
    "sharing a patient merged; a fold that holds one class only, such as one hospital's films "
    "of one class, scores that class's recall as its balanced accuracy)",
}
_VALIDATE = (
    "Validate on an external set from a source never seen in training "
    "(`automl-cxr evaluate --data ...`) and inspect Grad-CAM maps (`automl-cxr predict "
    "--explain`) before drawing any conclusion."
)


def _source_limitation(manifest: Any) -> str:
    """How the training data's sources line up with its classes (each class's largest source
    and its share), and why that matters."""
    parts = []
    for label, rows in manifest.groupby("label"):
        share = rows["source"].astype(str).value_counts(normalize=True)
        parts.append(f"{label} {share.iloc[0]:.0%} from {share.index[0]}")
    kids = " (Kermany: children aged 1-5)" if (manifest["source"] == "kermany").any() else ""
    return (
        "Public COVID-19 X-ray collections mix sources, which can line up with the labels "
        f"(here, each class's largest source: {', '.join(parts)}{kids}). A model can learn "
        "the source instead of the disease "
        "(DeGrave et al. 2021; Roberts et al. 2021 found none of 62 screened COVID-19 imaging "
        "models clinically usable)."
    )


def _cv_metrics(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    metrics = summary.get("metrics") or {}
    names = [m for m in CARD_METRICS if m in metrics]
    names += sorted(m for m in metrics if m.startswith(("sensitivity_", "specificity_")))
    for name in names:
        m = metrics[name]
        out[name] = {
            "mean": finite_or_none(m.get("mean")),
            "ci_low": clip01(finite_or_none(m.get("ci_low"))),
            "ci_high": clip01(finite_or_none(m.get("ci_high"))),
            "std": finite_or_none(m.get("std")),
            "n_folds": m.get("n"),
        }
    return out


def build_card(
    spec: Any,
    dataset: PreparedDataset,
    *,
    diagnostics: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    ensemble_folds: list[dict[str, Any]] | None = None,
    training_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    input_resolution: int | None = None,
    preprocess: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card as a plain dict (written as `model_card.json`, rendered by
    :func:`render_card`). `spec` is a :class:`~automl_cxr.deploy.TrialSpec`, `dataset` the
    training data, `diagnostics` the output of `source_diagnostics`; `ensemble_folds` (for a
    fold ensemble) each member's metrics on its own validation fold; `input_resolution` and
    `preprocess` what the exported graph takes and its roi/intensity layer (`deployable`),
    when they differ from the network's own input."""
    metrics = spec.metrics
    summary = metrics.get("summary") or {}
    cv = spec.train.cv
    meta = dataset.meta
    recipe = meta.get("recipe") or {}
    align = (
        (diagnostics or {}).get("alignment") or spec.study_attrs.get("source_label_alignment") or {}
    )
    probe = (diagnostics or {}).get("probe")
    warnings = list((diagnostics or {}).get("warnings") or [])
    if not warnings and align.get("warning"):
        warnings.append(align["warning"])
    by_source = {
        src: {
            "n": m.get("n"),
            "accuracy": finite_or_none(m.get("accuracy")),
            "balanced_accuracy": finite_or_none(m.get("balanced_accuracy")),
        }
        for src, m in (metrics.get("by_source") or {}).items()
    }
    counts = {k: int(v) for k, v in dataset.manifest["label"].value_counts().sort_index().items()}
    sources = {k: int(v) for k, v in dataset.manifest["source"].value_counts().sort_index().items()}
    return {
        "format": "automl-cxr-model-card/1",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "title": f"{spec.model.backbone} chest X-ray classifier ({', '.join(spec.classes)})",
        "intended_use": INTENDED_USE,
        "classes": list(spec.classes),
        "positive": spec.positive,
        "input": {
            **INPUT_CONTRACT,
            "resolution": int(input_resolution or spec.resolution),
            "network_resolution": int(spec.resolution),
            "preprocess": preprocess,
        },
        "model": {
            **spec.model.to_dict(),
            **(model_info or {}),
            "weight_source": spec.user_attrs.get("weight_source"),
        },
        "training": {
            "config": spec.train.to_dict(),
            "epochs": _epochs_info(training_info),
            "retrained_on": (
                f"all {len(dataset)} images of the study's training data"
                + (
                    f" ({held} of them, whole patients, held out to stop it)"
                    if (held := (training_info or {}).get("inner_holdout_images"))
                    else ""
                )
                if ensemble_folds is None
                else f"a fold ensemble: {len(ensemble_folds)} models, each trained on the other "
                f"folds of the trial's {CV_FOLDS[cv]} split of the {len(dataset)} images; "
                "the output averages their probabilities"
            ),
            "ensemble": None
            if ensemble_folds is None
            else [
                {
                    "fold": i,
                    "n_train": f.get("n_train"),
                    "n_val": f.get("n_val"),
                    "epochs_run": f.get("epochs_run"),
                    **{k: finite_or_none(f.get(k)) for k in CARD_METRICS if k in f},
                }
                for i, f in enumerate(ensemble_folds)
            ],
        },
        "data": {
            "dataset": spec.dataset,
            "kind": meta.get("kind"),
            "recipe": {
                "name": recipe.get("name"),
                "description": recipe.get("description"),
                "reference": recipe.get("reference"),
                "targets": recipe.get("targets"),
            }
            if recipe
            else None,
            "origin": meta.get("origin"),
            "manifest_hash": meta.get("subset_of") or dataset.hash,
            "training_hash": dataset.hash,  # the rows the exported model trained on
            "study_data_hash": spec.user_attrs.get("dataset_hash"),  # the search's rows
            "subset": meta.get("subset"),
            "images": len(dataset),
            "classes": counts,
            "sources": sources,
            "seed": meta.get("seed"),
        },
        "study": spec.describe(),
        "metrics": {
            "protocol": (
                f"{CV_FOLDS[cv]} {summary.get('n_folds', '?')}-fold cross-validation of this "
                f"configuration{_CV_NOTE[cv]}; mean and corrected resampled t 95% CI over "
                "folds (Nadeau & Bengio 2003; clipped to [0, 1])"
            ),
            "cv": _cv_metrics(summary),
            "by_source": by_source,
            "external": (
                None
                if not metrics.get("external")
                else {
                    "object": "the trial's cross-validation fold models, averaged, as the "
                    "search scored them; not this exported model (`automl-cxr evaluate --model "
                    "DIR --data ...` scores it)",
                    **metrics["external"],
                }
            ),
        },
        "diagnostics": {
            "source_label_alignment": {
                "cramers_v": align.get("cramers_v"),
                "confounded_classes": align.get("confounded_classes"),
                "warning": align.get("warning"),
            },
            "source_probe": probe,
        },
        "warnings": warnings,
        "limitations": [_CV_LIMITATION[cv], _source_limitation(dataset.manifest), _VALIDATE],
        "export": export or {},
        "calibration": None,
        "operating_point": None,
        "selected_ensemble": None,
        **(extra or {}),
    }


_EPOCHS_WHY = {
    "argument": "the median epoch chosen by early stopping in the trial's cross-validation folds "
    "(recorded by the search)",
    "cv_early_stopping": "the median epoch chosen by early stopping in the trial's "
    "cross-validation folds (retrained to find it)",
    "config": "the configured epochs, as every cross-validation fold trained (no early stopping)",
    "inner_early_stopping": "early stopping on an inner split of the patients, as each "
    "cross-validation fold was trained (the epoch with the best inner loss)",
}


def _epochs_info(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """How many epochs the exported model trained and why (what cross-validation scored)."""
    if not info or "epochs" not in info:
        return None
    src = str(info.get("epochs_from", ""))
    return {
        "epochs": int(info["epochs"]),
        "from": src,
        "why": _EPOCHS_WHY.get(src, src),
        "fold_epochs": info.get("fold_epochs"),
    }
