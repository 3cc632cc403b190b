"""`automl-cxr evaluate|export|predict|diagnose`: external validation, deployable models and
shortcut diagnostics. The work is done in `automl_cxr.deploy` / `automl_cxr.diagnostics`;
this module parses options; `_deploy_view.py` formats what they return."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from automl_cxr.cli import app
from automl_cxr.cli._common import err_console, out_console, parse_key_values
from automl_cxr.cli._deploy_opts import (
    AnySegmenterOpt,
    DataDirOpt,
    JsonOpt,
    QuietOpt,
    StudyNameOpt,
    StudyOpt,
    TrialOpt,
)
from automl_cxr.cli._deploy_view import ci_table, metric_rows, print_diagnose
from automl_cxr.errors import ConfigError


def _log(quiet: bool):
    return None if quiet else (lambda s: err_console.print(escape(s), highlight=False))


def _warn(lines: list[str] | None) -> None:
    for w in lines or []:
        err_console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)


def _echo_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


# ----------------------------------------------------------------------------- evaluate


@app.command("evaluate")
def evaluate(
    data: Annotated[
        Path, typer.Option("--data", help="External set: folder per class, or CSV manifest.")
    ],
    study: StudyOpt = None,
    study_name: StudyNameOpt = None,
    trial: TrialOpt = "best",
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Exported model folder (skips retraining the trial)."),
    ] = None,
    label_map: Annotated[
        list[str] | None,
        typer.Option("--label-map", help="Map external labels onto the study's: a=b,c=d."),
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Leave unreadable images out (listed).")
    ] = False,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    runtime: Annotated[
        str, typer.Option(help="With --model: torchscript|onnx|pytorch.")
    ] = "torchscript",
    data_dir: DataDirOpt = None,
    drop_overlap: Annotated[
        bool,
        typer.Option(
            "--drop-overlap",
            help="Leave out images that are a copy of a training image or a film of a "
            "training patient (listed) instead of refusing the set.",
        ),
    ] = False,
    any_segmenter: AnySegmenterOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a trial (retrained on all its training data) or an exported model on an
    external set: the study's metrics with 95% bootstrap CIs."""
    from automl_cxr.deploy import run_evaluate

    mapping = parse_key_values(label_map, option="--label-map")
    res = run_evaluate(
        data,
        study=study,
        study_name=study_name,
        trial=trial,
        model_dir=model,
        data_dir=data_dir,
        label_map=mapping,
        skip_bad=skip_bad,
        n_boot=n_boot,
        seed=seed,
        runtime=runtime,
        log=_log(quiet or as_json),
        drop_overlap=drop_overlap,
        any_segmenter=any_segmenter,
    )
    if as_json:
        _echo_json(res)
        _warn(res["warnings"])
        return
    c = out_console
    who = (
        f"study {res['study']['study']} trial {res['study']['trial']}"
        if res.get("study")
        else f"model {res['model'].get('dir')}"
    )
    how = (
        f"retrained on {res['model']['images']} training images"
        if res["model"]["kind"] == "retrained"
        else f"exported model ({res['model']['runtime']})"
    )
    c.print(
        f"[bold]external evaluation[/] of {who} ({how}) on {res['data']}",
        highlight=False,
    )
    c.print(
        f"{res['n_images']} images: "
        + ", ".join(f"{k} {v}" for k, v in res["counts"].items())
        + (f"; label map {res['label_map']}" if res["label_map"] else ""),
        highlight=False,
    )
    if res["rejected"]:
        c.print(f"[yellow]skipped {len(res['rejected'])} unreadable file(s)[/]")
        for r in res["rejected"][:10]:
            c.print(f"  {r['path']}: {r['reason']}", highlight=False, soft_wrap=True)
    boot = res["bootstrap"]
    c.print(
        ci_table(
            f"metrics with 95% bootstrap CI ({boot['n_boot']} resamples over "
            f"{boot['n_units']} {boot['unit']}s)",
            metric_rows(boot),
        )
    )
    op = res.get("operating_point")
    if op:
        ob = op["bootstrap"]
        target = "" if op.get("target") is None else f"={op['target']}"
        c.print(
            ci_table(
                f"at the model's operating point ({op['rule']}{target}: {op['positive']} if "
                f"p >= {float(op['threshold']):.4f}) instead of the arg-max",
                [row for row in metric_rows(ob) if row[0] != "auc"],
            )
        )
    cm = res["metrics"].get("confusion_matrix")
    if cm:
        ct = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
        ct.add_column("")
        for cls in res["classes"]:
            ct.add_column(cls, justify="right")
        for cls, row in zip(res["classes"], cm, strict=True):
            ct.add_row(cls, *[str(v) for v in row])
        c.print(ct)
    for note in res.get("notes") or []:
        c.print(f"note: {note}", style="dim", highlight=False)
    _warn(res["warnings"])


# ----------------------------------------------------------------------------- export


@app.command("export")
def export(
    study: Annotated[str, typer.Option("--study", help="SQLite file path or storage URL.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model into.")],
    study_name: StudyNameOpt = None,
    trial: TrialOpt = "best",
    data_dir: DataDirOpt = None,
    onnx_exporter: Annotated[
        str, typer.Option(help="ONNX exporter: auto (dynamo, else legacy) | dynamo | legacy.")
    ] = "auto",
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble/--retrain",
            help="Keep the trial's K cross-validation fold models, averaged, instead of "
            "retraining one model on all data.",
        ),
    ] = False,
    operating_point: Annotated[
        str | None,
        typer.Option(
            "--operating-point",
            help="Threshold on the positive class, chosen on the exported model's predictions on "
            "a calibration holdout of patients it does not train on: sensitivity=0.95, "
            "specificity=0.9 or youden.",
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="Bake in temperature scaling fitted on the exported model's predictions on a "
            "calibration holdout (about 1/5 of the patients, left out of its training); "
            "--no-calibrate without --operating-point trains on all the data.",
        ),
    ] = True,
    ensemble_select: Annotated[
        int | None,
        typer.Option(
            "--ensemble-select",
            help="Caruana ensemble selection over the study's trials, N rounds; the members are "
            "retrained and written as one graph.",
        ),
    ] = None,
    retrain_stop: Annotated[
        str,
        typer.Option(
            "--retrain-stop",
            help="How a retrained model stops (trials with early stopping): inner (an inner "
            "split of the patients stops it, as each fold was) or cv_epochs (all images, the "
            "median epoch count its folds chose).",
        ),
    ] = "inner",
    any_segmenter: AnySegmenterOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Retrain the chosen trial (or its fold ensemble), calibrated on patients it does not
    train on; write TorchScript, ONNX, weights, config and a model card (research only, not a
    medical device)."""
    from automl_cxr.deploy import run_export

    res = run_export(
        study,
        out,
        study_name=study_name,
        trial=trial,
        data_dir=data_dir,
        onnx_exporter=onnx_exporter,
        ensemble=ensemble,
        calibrate=calibrate,
        operating_point=operating_point,
        ensemble_select=ensemble_select,
        retrain_stop=retrain_stop,
        log=_log(quiet or as_json),
        any_segmenter=any_segmenter,
    )
    if as_json:
        _echo_json(res)
    else:
        s = res["study"]
        out_console.print(
            f"[green]exported[/] study {s['study']} trial {s['trial']}"
            + (
                f" (fold ensemble of {res['ensemble']['members']} models)"
                if res.get("ensemble")
                else ""
            )
            + f" → {res['out']}",
            highlight=False,
        )
        for f in res["files"]:
            out_console.print(f"  {f}", highlight=False, soft_wrap=True)
        ch = res["checks"]
        out_console.print(
            f"ONNX via {res['onnx']['exporter']} exporter (opset {res['onnx']['opset']}); "
            f"max |logit difference| vs PyTorch: TorchScript "
            f"{ch['torchscript_max_abs_diff']:.2g}, ONNX {ch['onnx_max_abs_diff']:.2g}",
            highlight=False,
        )
        sel = res.get("selected_ensemble")
        if sel:
            out_console.print(
                "selected ensemble: "
                + ", ".join(f"trial {m['trial']} × {m['weight']:.2f}" for m in sel["members"])
                + f"; out-of-fold {sel['metric']} {sel['score']:.4f} vs best single "
                f"{sel['best_single_score']:.4f} (optimistic; nested: "
                + (
                    f"{sel['nested']['ensemble']['mean']:.4f} vs "
                    f"{sel['nested']['best_single']['mean']:.4f})"
                    if sel["nested"].get("available")
                    else "n/a)"
                ),
                highlight=False,
                soft_wrap=False,
            )
        cal = res.get("calibration")
        if cal:
            b, a = cal["before"], cal["after"]
            out_console.print(
                f"temperature scaling T = {cal['temperature']:.3f}: holdout ECE "
                f"{b['ece']:.3f} → {a['ece']:.3f} (cross-fitted)"
                + ("" if cal.get("applied", True) else "; not applied (held-out NLL rose)"),
                highlight=False,
            )
        op = res.get("operating_point")
        if op:
            out_console.print(
                f"operating point {op['rule']}"
                + ("" if op["target"] is None else f"={op['target']}")
                + f": {op['positive']} if p >= {op['threshold']:.4f}; cross-fitted sensitivity "
                f"{op['sensitivity']:.3f} [{op['sensitivity_ci_low']:.3f}, "
                f"{op['sensitivity_ci_high']:.3f}], specificity {op['specificity']:.3f} "
                f"[{op['specificity_ci_low']:.3f}, {op['specificity_ci_high']:.3f}]",
                highlight=False,
                soft_wrap=False,
            )
        out_console.print(
            "intended use: research only, not a medical device (see model_card.md)",
            style="bold",
        )
    if not res["checks"]["ok"]:
        ch = res["checks"]
        _warn(
            [
                f"TorchScript/ONNX outputs differ from PyTorch by more than {ch['atol']:.1g} "
                f"(logits: TorchScript {ch['torchscript_max_abs_diff']:.2g}, ONNX "
                f"{ch['onnx_max_abs_diff']:.2g}; probabilities: "
                f"{ch['torchscript_max_prob_diff']:.2g}, {ch['onnx_max_prob_diff']:.2g})"
                + (f": {ch['note']}" if ch.get("note") else "")
                + "; check the runtimes before using them"
            ]
        )
    _warn(res["warnings"])


# ----------------------------------------------------------------------------- predict


@app.command("predict")
def predict(
    model_dir: Annotated[Path, typer.Argument(help="Folder written by `automl-cxr export`.")],
    images: Annotated[list[Path], typer.Argument(help="Image file(s) to classify.")],
    runtime: Annotated[
        str, typer.Option(help="torchscript | onnx (onnxruntime) | pytorch.")
    ] = "torchscript",
    explain: Annotated[
        bool, typer.Option("--explain", help="Write a Grad-CAM overlay PNG per image.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for the Grad-CAM PNGs.")] = Path(
        "gradcam"
    ),
    dicom_sc: Annotated[
        bool,
        typer.Option(
            "--dicom-sc",
            help="For DICOM inputs also write the Grad-CAM overlay as a DICOM Secondary Capture "
            "(implies --explain).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Class probabilities per image; --explain adds `<stem>_gradcam.png` heatmaps."""
    from automl_cxr.deploy import ExportedModel, predict_images

    m = ExportedModel(model_dir, runtime=runtime)
    explain = explain or dicom_sc
    res = predict_images(m, list(images), explain=explain, out_dir=out, dicom_sc=dicom_sc)
    if as_json:
        _echo_json(
            {"model": str(model_dir), "runtime": runtime, "classes": m.classes, "predictions": res}
        )
        return
    t = Table(
        title=f"class probabilities ({runtime}; research only, not a medical device)",
        title_justify="left",
    )
    t.add_column("image", overflow="fold")
    for c in m.classes:
        t.add_column(c, justify="right")
    t.add_column("predicted")
    op = m.operating_point
    if op is not None:
        t.add_column(f"at {op['positive']} ≥ {float(op['threshold']):.3f}")
    if explain:
        t.add_column("Grad-CAM", overflow="fold")
    for r in res:
        row = [
            Path(r["path"]).name,
            *[f"{r['probabilities'][c]:.3f}" for c in m.classes],
            r["predicted"],
        ]
        if op is not None:
            row.append(str(r["thresholded"]))
        if explain:
            row.append(
                str(r["gradcam"]) + (f"\n{r['gradcam_dicom']}" if r.get("gradcam_dicom") else "")
            )
        t.add_row(*row)
    out_console.print(t)


# ----------------------------------------------------------------------------- diagnose


@app.command("diagnose")
def diagnose(
    study: Annotated[str, typer.Option("--study", help="SQLite file path or storage URL.")],
    study_name: StudyNameOpt = None,
    trial: TrialOpt = "best",
    data_dir: DataDirOpt = None,
    control: Annotated[
        bool,
        typer.Option("--control", help="Also retrain with the central lung field blanked."),
    ] = False,
    blank_fraction: Annotated[
        float, typer.Option(help="Side of the blanked centre as a fraction of the image.")
    ] = 0.6,
    fill: Annotated[str, typer.Option(help="Blank with each image's mean, or zero.")] = "mean",
    probe_size: Annotated[int, typer.Option(help="Thumbnail side of the source probe.")] = 32,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Is the model reading the source instead of the disease? Alignment, source probe,
    per-source metrics and (--control) a lung-blanked control run."""
    from automl_cxr.deploy import run_diagnose

    if fill not in ("mean", "zero"):
        raise ConfigError(f"--fill must be 'mean' or 'zero', but got {fill!r}")
    res = run_diagnose(
        study,
        study_name=study_name,
        trial=trial,
        data_dir=data_dir,
        control=control,
        blank_fraction=blank_fraction,
        fill=fill,
        probe_size=probe_size,
        log=_log(quiet or as_json),
    )
    if as_json:
        _echo_json(res)
    else:
        print_diagnose(res)
    _warn(res["warnings"])
