"""What `automl-cxr dashboard` shows in optuna-dashboard: a Markdown note and image artifacts
for every COMPLETE trial, and the report's key Plotly figures on the study page.

* Trial notes (``optuna_dashboard.save_note``): per-fold table with mean and 95 % CI,
  per-class sensitivity/specificity of the pooled out-of-fold predictions, calibration (ECE
  with its CI, Brier), the configuration and the weight source.
* Trial artifacts: confusion matrix, ROC, reliability and learning-curve PNGs drawn with
  matplotlib (offline; Plotly's static export would need kaleido and a browser). They are
  written to the study's artifact store (:func:`automl_cxr.oof.artifact_store`) and
  registered the way optuna-dashboard lists a finished trial's artifacts (study system
  attributes ``dashboard:artifacts:<trial_id>:<artifact_id>``): Optuna's own
  ``upload_artifact`` only accepts running trials.
* Study figures (``optuna_dashboard.save_plotly_graph_object``) with fixed ids, so
  publishing again replaces them; a study note with the leaderboard.

Publishing is idempotent: a trial already published (study system attribute
``automl-cxr:dashboard:<trial_id>``) is skipped unless ``force``.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from automl_cxr._compat.optuna import (
    dashboard_artifact,
    dashboard_note,
    storage_of,
    study_id,
    trial_id,
)
from automl_cxr._numbers import clip01, fmt_num
from automl_cxr.engine import CV_FOLDS
from automl_cxr.errors import DataError, StorageError
from automl_cxr.oof import artifact_store, calibration_summary, load_oof
from automl_cxr.report._records import params_text

__all__ = ["DASHBOARD_FIGURES", "publish_dashboard", "trial_note"]

DASHBOARD_FIGURES = ("history", "backbones", "roc", "reliability", "pareto", "importance")
_MARK = "automl-cxr:dashboard:"
_VERSION = "1"


def _f(x: Any, spec: str = ".4f") -> str:
    return fmt_num(x, spec)


def trial_note(trial: FrozenTrial, calibration: Mapping[str, Any] | None = None) -> str:
    """The Markdown note of one COMPLETE trial."""
    ua = trial.user_attrs
    m = ua.get("metrics") or {}
    summary = (m.get("summary") or {}).get("metrics") or {}
    folds = m.get("folds") or []
    splits = m.get("splits") or []
    keys = [
        k
        for k in (
            "balanced_accuracy",
            "accuracy",
            "macro_f1",
            "auc",
            "covid_sensitivity",
            "covid_specificity",
        )
        if k in summary
    ]
    out = [f"## Trial {trial.number} — automl-cxr", ""]
    out.append(f"`{params_text(trial.params)}`")
    cv = next((sp.get("cv") for sp in splits if sp.get("cv") in CV_FOLDS), None)
    out += ["", f"### Cross-validation ({CV_FOLDS[cv] + ' ' if cv else ''}folds)", ""]
    out.append("| fold | images | " + " | ".join(keys) + " |")
    out.append("| ---: | ---: | " + " | ".join("---:" for _ in keys) + " |")
    for i, f in enumerate(folds):
        n = (splits[i] if i < len(splits) else {}).get("n_val", f.get("n", "-"))
        out.append(f"| {i} | {n} | " + " | ".join(_f(f.get(k)) for k in keys) + " |")
    out.append(
        "| **mean** | | " + " | ".join(f"**{_f(summary[k].get('mean'))}**" for k in keys) + " |"
    )
    out.append(
        "| 95% CI | | "
        + " | ".join(
            f"[{_f(clip01(summary[k].get('ci_low')))}, {_f(clip01(summary[k].get('ci_high')))}]"
            for k in keys
        )
        + " |"
    )
    per_class = (m.get("pooled") or {}).get("per_class") or {}
    if per_class:
        out += ["", "### Per class (pooled out-of-fold predictions)", ""]
        out += [
            "| class | sensitivity | specificity | AUC | images |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, c in per_class.items():
            out.append(
                f"| {label} | {_f(c.get('sensitivity'), '.3f')} | "
                f"{_f(c.get('specificity'), '.3f')} | {_f(c.get('auc'), '.3f')} | "
                f"{c.get('support', '-')} |"
            )
    out += ["", "### Calibration", ""]
    if calibration:
        out.append(
            f"ECE {_f(calibration['ece'], '.3f')} [{_f(calibration['ece_ci_low'], '.3f')}, "
            f"{_f(calibration['ece_ci_high'], '.3f')}] (top label, {calibration['n_bins']} bins, "
            f"patient-level bootstrap CI); Brier {_f(calibration['brier'], '.3f')}; "
            f"NLL {_f(calibration['nll'], '.3f')}."
        )
    else:
        out.append("No stored out-of-fold predictions for this trial.")
    ws = ua.get("weight_source") or {}
    out += ["", "### Weights", ""]
    out.append(
        f"{ws.get('kind', 'unknown')}: {ws.get('description') or ws.get('path') or '-'}"
        if ws
        else "not recorded"
    )
    cfg = ua.get("config") or {}
    out += ["", "### Configuration", ""]
    for part in ("model", "train"):
        if cfg.get(part):
            out += [f"`{part}`: `{json.dumps(cfg[part], default=str)}`", ""]
    out.append(
        f"\nlatency {_f(ua.get('latency_ms'), '.2f')} ms · parameters "
        f"{int(ua.get('params_total') or 0):,} · trained {_f(ua.get('train_seconds'), '.1f')} s"
        f" on {ua.get('device', '?')}"
    )
    return "\n".join(out) + "\n"


def _png(draw) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _images(trial: FrozenTrial, oof: Any) -> dict[str, bytes]:
    """File name → PNG bytes of one trial's figures (those whose data it has)."""
    m = trial.user_attrs.get("metrics") or {}
    summary = m.get("summary") or {}
    classes = list(summary.get("classes") or m.get("classes") or [])
    out: dict[str, bytes] = {}
    cm = summary.get("confusion_matrix") or trial.user_attrs.get("confusion_matrix")
    if cm and classes:
        a = np.asarray(cm)

        def confusion(ax) -> None:
            ax.imshow(a, cmap="Blues")
            for (i, j), v in np.ndenumerate(a):
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    color="white" if v > a.max() / 2 else "black",
                )
            ax.set_xticks(range(len(classes)), classes, rotation=30)
            ax.set_yticks(range(len(classes)), classes)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"trial {trial.number}: confusion matrix (summed over folds)")

        out["confusion_matrix.png"] = _png(confusion)
    roc = m.get("roc") or {}
    if roc:

        def curves(ax) -> None:
            for label, c in roc.items():
                ax.plot(
                    c.get("fpr") or [],
                    c.get("tpr") or [],
                    label=f"{label} (AUC {_f(c.get('auc'), '.3f')})",
                )
            ax.plot([0, 1], [0, 1], ":", color="#999")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"trial {trial.number}: ROC, one vs rest (out-of-fold)")
            ax.legend(loc="lower right", fontsize=8)

        out["roc.png"] = _png(curves)
    if oof is not None:
        v = oof.valid()
        rel = calibration_summary(v.probs, v.labels, groups=v.groups, n_boot=10)["reliability"]

        def reliability(ax) -> None:
            ax.plot([0, 1], [0, 1], ":", color="#999", label="perfect")
            ax.plot(rel["confidence"], rel["accuracy"], "o-", label="out-of-fold")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("confidence (top-class probability)")
            ax.set_ylabel("accuracy")
            ax.set_title(f"trial {trial.number}: reliability")
            ax.legend(loc="upper left", fontsize=8)

        out["reliability.png"] = _png(reliability)
    lc = m.get("curves") or []
    if lc:

        def learning(ax) -> None:
            for fold, points in enumerate(lc):
                ep = [p.get("epoch", i) for i, p in enumerate(points)]
                ax.plot(ep, [p.get("train_loss") for p in points], "-", label=f"fold {fold} train")
                if any("val_loss" in p for p in points):
                    ax.plot(ep, [p.get("val_loss") for p in points], "--", label=f"fold {fold} val")
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.set_title(f"trial {trial.number}: learning curves")
            ax.legend(fontsize=7)

        out["learning_curves.png"] = _png(learning)
    return out


def _register(study: optuna.Study, store: Any, trial: FrozenTrial, name: str, data: bytes) -> str:
    artifact_id = str(uuid.uuid4())
    store.write(artifact_id, io.BytesIO(data))
    meta = {"artifact_id": artifact_id, "filename": name, "mimetype": "image/png", "encoding": None}
    dashboard_artifact(study, trial, artifact_id, meta)
    return artifact_id


def publish_dashboard(
    study: optuna.Study, storage: Any, *, force: bool = False, figures: bool = True
) -> dict[str, Any]:
    """Notes and artifacts for every COMPLETE trial not yet published (all with `force`), and
    the study's key figures and leaderboard note. Returns what was done."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    problems: list[str] = []  # what could not be published, said by the CLI
    try:
        store = artifact_store(storage, create=True)
    except OSError as exc:  # no writable folder beside the study: notes and figures only
        store = None
        problems.append(f"no trial images: the artifact folder cannot be created ({exc})")
    attrs = storage_of(study).get_study_system_attrs(study_id(study))
    done, skipped = [], 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not force and attrs.get(f"{_MARK}{trial_id(t)}") == _VERSION:
            skipped += 1
            continue
        try:
            oof = load_oof(t, storage)
        except DataError as exc:  # damaged: the note and images go without it, and it is said
            oof = None
            problems.append(str(exc))
        cal = None
        if oof is not None:
            v = oof.valid()
            cal = calibration_summary(v.probs, v.labels, groups=v.groups, n_boot=300)
        dashboard_note(study, t, trial_note(t, cal))
        names = []
        if store is not None:
            for name, png in _images(t, oof).items():
                _register(study, store, t, name, png)
                names.append(name)
        storage_of(study).set_study_system_attr(study_id(study), f"{_MARK}{trial_id(t)}", _VERSION)
        done.append({"trial": t.number, "artifacts": names})
    saved: list[str] = []
    if figures and (done or force):
        from automl_cxr.report._data import build_report_data
        from automl_cxr.report._figures import build_figures
        from automl_cxr.report._tables import leaderboard_rows, markdown_table

        try:
            data = build_report_data(study, storage=str(storage))
        except StorageError as exc:  # nothing ranked yet: notes only
            data = None
            problems.append(f"no study figures: {exc}")
        if data is not None:
            figs = build_figures(data)
            for key in DASHBOARD_FIGURES:
                if key in figs:
                    save_plotly_graph_object(study, figs[key], graph_object_id=f"automl-cxr-{key}")
                    saved.append(key)
            h, r = leaderboard_rows(data, 10)
            save_note(
                study,
                f"## automl-cxr: {data.study_name}\n\nRanked by {data.metric} (mean over "
                f"{data.folds}, 95% CI). Trial notes hold the per-fold tables; the "
                "figures below are the report's (`automl-cxr report`).\n\n" + markdown_table(h, r),
            )
    return {
        "published": done,
        "skipped": skipped,
        "figures": saved,
        "artifacts": store is not None,
        "problems": problems,
    }
