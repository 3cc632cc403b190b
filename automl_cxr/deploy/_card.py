"""The model card: what the exported model is, what it was trained on, how well the
configuration scored (with intervals), what may be wrong with it, and what it is not for."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from automl_cxr._numbers import clip01, finite_or_none
from automl_cxr.data import PreparedDataset
from automl_cxr.engine import SCALAR_METRICS

__all__ = ["CARD_METRICS", "INPUT_CONTRACT", "INTENDED_USE", "build_card", "render_card"]

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

_LIMITATIONS = (
    "Metrics are patient-grouped cross-validation estimates of the *configuration* on the "
    "study's data, not of this exact model (retrained on all of it; or, for a fold ensemble, "
    "whose members were each scored only on their own held-out fold), and not of performance "
    "on other hospitals, scanners or populations.",
    "Public COVID-19 X-ray collections mix sources: in the paper's recipes every COVID-19 image "
    "comes from one collection of adults and the other classes from a paediatric collection "
    "(Kermany: children aged 1-5). A model can learn the source instead of the disease "
    "(DeGrave et al. 2021; Roberts et al. 2021 found none of 62 screened COVID-19 imaging "
    "models clinically usable).",
    "Validate on an external set from a source never seen in training "
    "(`automl-cxr evaluate --data ...`) and inspect Grad-CAM maps (`automl-cxr predict "
    "--explain`) before drawing any conclusion.",
)


_f = finite_or_none
_clip = clip01


def _cv_metrics(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    metrics = summary.get("metrics") or {}
    names = [m for m in CARD_METRICS if m in metrics]
    names += sorted(m for m in metrics if m.startswith(("sensitivity_", "specificity_")))
    for name in names:
        m = metrics[name]
        out[name] = {
            "mean": _f(m.get("mean")),
            "ci_low": _clip(_f(m.get("ci_low"))),
            "ci_high": _clip(_f(m.get("ci_high"))),
            "std": _f(m.get("std")),
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
) -> dict[str, Any]:
    """The model card as a plain dict (written as `model_card.json`, rendered by
    :func:`render_card`). `spec` is a :class:`~automl_cxr.deploy.TrialSpec`, `dataset` the
    training data, `diagnostics` the output of `source_diagnostics`; `ensemble_folds` (for a
    fold ensemble) each member's metrics on its own validation fold."""
    metrics = spec.metrics
    summary = metrics.get("summary") or {}
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
            "accuracy": _f(m.get("accuracy")),
            "balanced_accuracy": _f(m.get("balanced_accuracy")),
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
        "input": {**INPUT_CONTRACT, "resolution": spec.resolution},
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
                if ensemble_folds is None
                else f"a fold ensemble: {len(ensemble_folds)} models, each trained on the other "
                f"folds of the trial's patient-grouped split of the {len(dataset)} images; "
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
                    **{k: _f(f.get(k)) for k in CARD_METRICS if k in f},
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
                f"patient-grouped {summary.get('n_folds', '?')}-fold cross-validation of this "
                "configuration; mean and corrected resampled t 95% CI over folds (Nadeau & Bengio "
                "2003; clipped to [0, 1])"
            ),
            "cv": _cv_metrics(summary),
            "by_source": by_source,
            "external": metrics.get("external"),
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
        "limitations": list(_LIMITATIONS),
        "export": export or {},
        "calibration": None,
        "operating_point": None,
        "selected_ensemble": None,
        **(extra or {}),
    }


def _fmt(x: Any, spec: str = ".3f") -> str:
    v = _f(x)
    return "n/a" if v is None else format(v, spec)


def _ci_text(d: dict[str, Any], key: str) -> str:
    return f"{_fmt(d.get(key))} [{_fmt(d.get(key + '_ci_low'))}, {_fmt(d.get(key + '_ci_high'))}]"


def _est_ci(d: dict[str, Any]) -> str:
    return f"{_fmt(d.get('estimate'))} [{_fmt(d.get('ci_low'))}, {_fmt(d.get('ci_high'))}]"


def _clinic_lines(card: dict[str, Any]) -> list[str]:
    """Calibration, operating point and ensemble selection sections of the card."""
    lines: list[str] = []
    sel = card.get("selected_ensemble")
    if sel:
        lines += ["", "## Ensemble selected across trials", ""]
        lines.append(
            f"Caruana greedy forward selection with replacement ({sel['n_rounds']} rounds) over "
            f"the out-of-fold predictions of {sel['candidates']} complete trials, on "
            f"{sel['metric']}; each member retrained on all the training data; the graph "
            "averages the members' probabilities with these weights."
        )
        lines += ["", "| trial | weight | its own out-of-fold score |", "| ---: | ---: | ---: |"]
        lines += [
            f"| {m['trial']} | {m['weight']:.3f} | {_fmt(m.get('single_score'), '.4f')} |"
            for m in sel["members"]
        ]
        lines += [
            "",
            f"- out-of-fold {sel['metric']}: ensemble {_fmt(sel['score'], '.4f')}, best single "
            f"trial ({sel['best_single']}) {_fmt(sel['best_single_score'], '.4f')} — "
            + sel["caveat"],
        ]
        n = sel.get("nested") or {}
        if n.get("available"):
            e, b = n["ensemble"], n["best_single"]
            lines.append(
                f"- nested estimate (select on K-1 folds, score the held-out one): ensemble "
                f"{_fmt(e['mean'], '.4f')} [{_fmt(_clip(e['ci_low']), '.4f')}, "
                f"{_fmt(_clip(e['ci_high']), '.4f')}], best single {_fmt(b['mean'], '.4f')} "
                f"[{_fmt(_clip(b['ci_low']), '.4f')}, {_fmt(_clip(b['ci_high']), '.4f')}] "
                "(95% t-interval over folds, clipped to [0, 1])"
            )
    ts = card.get("test_split")
    if ts:
        lines += ["", "## Test split (never seen by the search)", ""]
        held = ", ".join(f"{c} {n}" for c, n in (ts.get("classes") or {}).items())
        lines.append(
            f"`search --test {ts['spec']}` set {ts['images']} images of {ts['patients']} "
            f"patients ({held}) aside before the search; no choice of the search saw them."
        )
        lines.append("")
        lines.append(f"- this exported model: {ts['metric']} {_est_ci(ts['exported'])}")
        if ts.get("trial_fold_models"):
            lines.append(
                f"- the trial's fold models (as the search scored it): {ts['metric']} "
                f"{_est_ci(ts['trial_fold_models'])}"
            )
        lines += ["", "95% CIs: bootstrap over the test split's patients."]
    cal = card.get("calibration")
    if cal:
        b, a = cal["before"], cal["after"]
        ins = cal.get("after_in_sample")
        lines += ["", "## Calibration", ""]
        applied = cal.get("applied", True)
        lines.append(
            f"Temperature scaling: T = {cal['temperature']:.3f}, fitted on {cal['fitted_on']}; "
            + (
                "baked into model.ts / model.onnx (softmax(logits / T))."
                if applied
                else "**not applied**: on held-out patients (cross-fitted) it raised the NLL, "
                "so the exported probabilities are the model's own."
            )
        )
        lines += [
            "",
            "| | ECE [95% CI] | Brier | NLL |",
            "| --- | --- | ---: | ---: |",
            f"| before | {_ci_text(b, 'ece')} | {_fmt(b['brier'])} | {_fmt(b['nll'])} |",
            f"| after, cross-fitted | {_ci_text(a, 'ece')} | {_fmt(a['brier'])} | "
            f"{_fmt(a['nll'])} |",
        ]
        if ins:
            lines.append(
                f"| after, in-sample | {_ci_text(ins, 'ece')} | {_fmt(ins['brier'])} | "
                f"{_fmt(ins['nll'])} |"
            )
        lines += [
            "",
            f"ECE: top-label expected calibration error ({b['n_bins']} bins) of the exported "
            f"model's predictions on the {b['n']} holdout images, 95% CI from a bootstrap over "
            f"{b['n_groups']} patients. Cross-fitted ({cal.get('crossfit', 'parts')}): each "
            "part scored with a temperature fitted on the other parts. The in-sample row is "
            "scored on the predictions its temperature was fitted on (optimistic).",
        ]
    op = card.get("operating_point")
    if op:
        target = "" if op.get("target") is None else f"={op['target']}"
        ins = op.get("in_sample") or {}
        lines += ["", "## Operating point", ""]
        lines.append(
            f"`{op['rule']}{target}` on `{op['positive']}`: called {op['positive']} when its "
            f"probability is >= {op['threshold']:.4f} (else the most probable other class); "
            f"chosen on {op['chosen_on']}"
            + (" after temperature scaling" if op.get("calibrated") else "")
            + "."
        )
        lines += [
            "",
            f"- expected sensitivity {_ci_text(op, 'sensitivity')} (cross-fitted)",
            f"- expected specificity {_ci_text(op, 'specificity')} (cross-fitted)",
        ]
        if ins:
            lines.append(
                f"- in-sample (chosen and scored on the same images): sensitivity "
                f"{_fmt(ins['sensitivity'])}, specificity {_fmt(ins['specificity'])}"
            )
        lines += [
            f"- at the arg-max instead: sensitivity {_fmt(op['argmax_sensitivity'])}, "
            f"specificity {_fmt(op['argmax_specificity'])}",
            "",
            f"Cross-fitted ({op.get('crossfit', 'parts')}): each part's threshold chosen on the "
            "other parts, the pooled held-out calls scored; 95% CIs: bootstrap over patients. "
            "Check it on an external set (`automl-cxr evaluate --model DIR`).",
        ]
    return lines


def render_card(card: dict[str, Any]) -> str:
    """Markdown for `model_card.md`."""
    lines: list[str] = [f"# Model card: {card['title']}", ""]
    lines += ["> **Intended use: research only, not a medical device.**", ">"]
    lines += [f"> {card['intended_use']}", ""]
    if card["warnings"]:
        lines += ["## Warnings", ""]
        lines += [f"- **Shortcut risk:** {w}" for w in card["warnings"]]
        lines.append("")
    m = card["model"]
    inp = card["input"]
    lines += [
        "## Model",
        "",
        f"- backbone: `{m['backbone']}` (frozen stages {m['frozen_stages']}, head `{m['head']}` "
        f"{m.get('head_kwargs') or {}}, gray mode `{m['gray_mode']}`)",
        f"- classes (output order): {', '.join(card['classes'])}",
        f"- resolution: {inp['resolution']} x {inp['resolution']}",
    ]
    if m.get("params_total"):
        lines.append(f"- parameters: {m['params_total']:,}")
    ws = m.get("weight_source") or {}
    if ws:
        lines.append(
            f"- initial weights: {ws.get('kind')} ({ws.get('description') or ws.get('path')})"
        )
    lines += [
        "",
        "## Input contract",
        "",
        f"`{inp['shape']}` {inp['dtype']} in {inp['range']}, R = {inp['resolution']}. "
        + inp["description"],
        "",
    ]
    d = card["data"]
    lines += ["## Training data", ""]
    lines.append(f"- dataset: `{d['dataset']}` ({d.get('kind') or 'prepared'})")
    if d.get("recipe"):
        r = d["recipe"]
        lines.append(f"- recipe: {r.get('description')}")
        if r.get("reference"):
            lines.append(f"- reference: {r['reference']}")
    if d.get("origin"):
        lines.append(f"- origin: {d['origin']}")
    lines.append(f"- manifest hash: `{d['manifest_hash']}`")
    if d.get("subset"):
        lines.append(f"- subset: {d['subset']} (hash `{d['training_hash']}`)")
    lines.append(
        f"- images: {d['images']} ("
        + ", ".join(f"{k} {v}" for k, v in d["classes"].items())
        + "); sources: "
        + ", ".join(f"{k} {v}" for k, v in d["sources"].items())
    )
    lines.append(f"- {card['training']['retrained_on']}")
    ep = card["training"].get("epochs")
    if ep:
        lines.append(f"- trained for {ep['epochs']} epochs: {ep['why']}")
    members = card["training"].get("ensemble") or []
    if members:
        lines += ["", "Fold members (each scored on its own validation fold):", ""]
        lines += [
            "| fold | train | val | epochs | balanced accuracy | accuracy |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {f['fold']} | {f['n_train']} | {f['n_val']} | {f['epochs_run']} | "
            f"{_fmt(f.get('balanced_accuracy'))} | {_fmt(f.get('accuracy'))} |"
            for f in members
        ]
    s = card["study"]
    lines += [
        "",
        "## Study",
        "",
        f"- study `{s['study']}`, trial {s['trial']} (objectives {', '.join(s['objectives'])}: "
        + ", ".join(_fmt(v, ".4f") for v in s["values"])
        + ")",
    ]
    if s.get("storage"):
        lines.append(f"- storage: `{s['storage']}`")
    met = card["metrics"]
    lines += ["", "## Metrics", "", f"{met['protocol']}.", ""]
    lines += ["| metric | mean | 95% CI |", "| --- | ---: | --- |"]
    for name, v in met["cv"].items():
        lines.append(
            f"| {name} | {_fmt(v['mean'])} | [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] |"
        )
    if met["by_source"]:
        lines += ["", "Out-of-fold metrics per image source:", ""]
        lines += [
            "| source | images | accuracy | balanced accuracy |",
            "| --- | ---: | ---: | ---: |",
        ]
        for src, v in met["by_source"].items():
            lines.append(
                f"| {src} | {v['n']} | {_fmt(v['accuracy'])} | {_fmt(v['balanced_accuracy'])} |"
            )
    lines += _clinic_lines(card)
    diag = card["diagnostics"]
    al = diag["source_label_alignment"]
    lines += ["", "## Diagnostics", ""]
    lines.append(f"- source-label alignment: Cramér's V = {_fmt(al.get('cramers_v'), '.2f')}")
    for c in al.get("confounded_classes") or []:
        lines.append(f"  - every `{c['label']}` image comes from `{c['source']}`")
    pr = diag.get("source_probe")
    if pr:
        if pr.get("auc") is not None:
            lines.append(
                f"- source probe: the image source is predicted from pixels with ROC-AUC "
                f"{_fmt(pr['auc'])} ({pr['method']})"
            )
        else:
            lines.append(f"- source probe: not run ({pr.get('note')})")
    lines += ["", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    ex = card.get("export") or {}
    if ex.get("files"):
        lines += ["", "## Files", ""]
        for name, info in ex["files"].items():
            lines.append(
                f"- `{name}`: {info.get('what', '')} (sha256 `{info.get('sha256', '')[:16]}…`)"
            )
    lines.append("")
    return "\n".join(lines)


_EPOCHS_WHY = {
    "argument": "the median epoch chosen by early stopping in the trial's cross-validation folds "
    "(recorded by the search)",
    "cv_early_stopping": "the median epoch chosen by early stopping in the trial's "
    "cross-validation folds (retrained to find it)",
    "config": "the configured epochs, as every cross-validation fold trained (no early stopping)",
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
