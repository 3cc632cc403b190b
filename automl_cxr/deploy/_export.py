"""Write a trained `CxrModel` as a self-contained model folder: TorchScript, ONNX, state dict,
config and model card. Loading it back (`ExportedModel`) needs neither the training data nor
pretrained weights."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automl_cxr.deploy._card import INPUT_CONTRACT, build_card
from automl_cxr.deploy._card_text import render_card
from automl_cxr.deploy._graphs import TemperatureScaled, unwrap
from automl_cxr.deploy._runtime import onnx_session, require
from automl_cxr.errors import AutomlCxrError, ConfigError
from automl_cxr.lungs import CANVAS, Preprocessed, preprocess_for, preprocess_record
from automl_cxr.models import CxrEnsemble, CxrModel, file_sha256

__all__ = [
    "EXPORT_FORMAT",
    "MODEL_FILES",
    "ONNX_EXPORTERS",
    "export_model",
    "export_trial",
    "export_torchscript",
    "export_onnx",
    "deployable",
    "train_for_export",
]

EXPORT_FORMAT = "automl-cxr-model/1"
MODEL_FILES = {
    "model.ts": "TorchScript (torch.jit.trace), input (B, 1, R, R) float in [0, 1] → logits",
    "model.onnx": "ONNX, input 'image' (batch, 1, R, R) float32 in [0, 1] → 'logits'",
    "model.pt": "PyTorch state dict of the CxrModel described by config.json",
    "config.json": "model and training configuration, classes, resolution, input contract",
    "model_card.md": "model card (human-readable)",
    "model_card.json": "model card (machine-readable)",
}
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
CHECK_ATOL = 1e-4

_log = logging.getLogger(__name__)


def export_torchscript(model: CxrModel | CxrEnsemble, path: Path, resolution: int) -> None:
    """`torch.jit.trace` of the model (eval mode) on a (1, 1, R, R) input; the batch size
    stays free."""
    example = torch.rand(1, 1, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # jit deprecation notices and tracer warnings
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path))


def export_onnx(
    model: CxrModel | CxrEnsemble, path: Path, resolution: int, exporter: str = "auto"
) -> dict:
    """ONNX with a dynamic batch axis: input `image`, output `logits`.

    `exporter`: "dynamo" (torch.export based, needs onnxscript), "legacy" (TorchScript based),
    or "auto" (dynamo, falling back to legacy if it fails). Returns what was used.
    """
    if exporter not in ONNX_EXPORTERS:
        raise ConfigError(
            f"ONNX exporter must be one of {', '.join(ONNX_EXPORTERS)}, but got {exporter!r}"
        )
    require("onnx", "onnx", "ONNX export")
    if exporter in ("auto", "dynamo"):
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError:
            if exporter == "dynamo":
                require("onnxscript", "onnxscript", "the dynamo ONNX exporter")
            exporter = "legacy"
    example = torch.rand(1, 1, resolution, resolution, generator=torch.Generator().manual_seed(0))
    errors: list[str] = []
    order = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    for kind in order:
        path.unlink(missing_ok=True)
        sink = io.StringIO()
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(sink),
                contextlib.redirect_stderr(sink),
                torch.no_grad(),
            ):
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    torch.onnx.export(
                        model,
                        (example,),
                        str(path),
                        dynamo=True,
                        input_names=["image"],
                        output_names=["logits"],
                        dynamic_shapes=({0: batch},),
                        external_data=False,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        model,
                        (example,),
                        str(path),
                        dynamo=False,
                        input_names=["image"],
                        output_names=["logits"],
                        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                        opset_version=17,
                    )
            if not path.is_file():
                raise RuntimeError("the exporter wrote no file")
            import onnx

            opset = next(
                (
                    o.version
                    for o in onnx.load(str(path), load_external_data=False).opset_import
                    if o.domain in ("", "ai.onnx")
                ),
                None,
            )
            return {"exporter": kind, "opset": opset, "fallback_from": errors or None}
        except Exception as exc:  # exporters raise many kinds; try the next one
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{kind}: {type(exc).__name__}: {msg[:300]}")
            _log.info("ONNX export with %s failed: %s", kind, msg)
    raise AutomlCxrError("ONNX export failed: " + "; ".join(errors))


def _check_runtimes(model: CxrModel | CxrEnsemble, folder: Path, resolution: int) -> dict[str, Any]:
    """Largest absolute logit difference of TorchScript and ONNX against PyTorch on a random
    batch of 3 (also checks that the batch axis is free)."""
    x = torch.rand(3, 1, resolution, resolution, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.load(str(folder / "model.ts"), map_location="cpu").eval()
        ts_out = ts(x).numpy()
    sess = onnx_session(folder / "model.onnx")
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    scale = max(1.0, float(np.abs(ref).max()))
    d_ts = float(np.abs(ts_out - ref).max())
    d_onnx = float(np.abs(onnx_out - ref).max())
    p_ref = torch.softmax(torch.from_numpy(ref), dim=1)
    out = {
        "batch": 3,
        "atol": CHECK_ATOL * scale,
        "torchscript_max_abs_diff": d_ts,
        "onnx_max_abs_diff": d_onnx,
        "torchscript_max_prob_diff": _prob_diff(ts_out, p_ref),
        "onnx_max_prob_diff": _prob_diff(onnx_out, p_ref),
        "ok": d_ts <= CHECK_ATOL * scale and d_onnx <= CHECK_ATOL * scale,
    }
    if isinstance(model, Preprocessed):
        out["note"] = PREPROCESS_ROUNDING
    return out


PREPROCESS_ROUNDING = (
    "the roi/intensity layer takes decisions inside the graph (a lung-mask pixel is on where "
    "the segmenter's logit is above 0; its output is rounded to gray levels, as the search's "
    "image cache stores them): where a runtime's float arithmetic lands on the other side of "
    "one, a pixel moves and the logits by more than float error. The rounding itself runs in "
    "float64 and decides exact ties explicitly, so it agrees across runtimes (README, 'The "
    "same transform everywhere')"
)
"""Why a graph with the roi/intensity layer can miss the runtime check's tolerance."""


def _prob_diff(logits: np.ndarray, p_ref: torch.Tensor) -> float:
    return float((torch.softmax(torch.from_numpy(logits), dim=1) - p_ref).abs().max())


def export_model(
    model: CxrModel | CxrEnsemble,
    out_dir: str | Path,
    *,
    classes: list[str],
    resolution: int,
    train_config: dict[str, Any] | None = None,
    positive: str | None = None,
    card: Callable[[dict[str, Any]], dict[str, Any]] | dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    onnx_exporter: str = "auto",
) -> dict[str, Any]:
    """Write `model.ts`, `model.onnx`, `model.pt`, `config.json` and (given `card`) the model
    card into `out_dir`; returns the config written (with `files`, `checks`).

    `card` is a card dict, or a function of the export info returning one (so the card can list
    the files and checks). Existing files of these names are replaced; others are left alone.
    A `CxrEnsemble` is written the same way (one graph holding every member); its output is
    the log of the members' mean probability, recorded as `ensemble` in `config.json`.
    """
    if len(classes) != model.config.num_classes:
        raise ConfigError(
            f"classes {classes} do not match the model's {model.config.num_classes} outputs"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    inner, temperature = unwrap(model)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    try:
        export_torchscript(model, tmp / "model.ts", resolution)
        onnx_info = export_onnx(model, tmp / "model.onnx", resolution, onnx_exporter)
        torch.save(model.state_dict(), tmp / "model.pt")
        checks = _check_runtimes(model, tmp, resolution)
        total, trainable = model.param_counts()
        config = {
            "format": EXPORT_FORMAT,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "classes": list(classes),
            "positive": positive,
            "resolution": int(resolution),
            "input": {**INPUT_CONTRACT, "resolution": int(resolution), "name": "image"},
            "output": {"name": "logits", "shape": "(B, C)", "classes": list(classes)},
            "model": model.config.to_dict(),
            "ensemble": (
                {
                    "members": len(inner),
                    "combine": "mean of the members' softmax probabilities; the output is its "
                    "log, so softmax(output) is that mean",
                }
                if isinstance(inner, CxrEnsemble)
                else None
            ),
            "calibration": None if temperature is None else {"temperature": temperature},
            "train": dict(train_config or {}),
            "params_total": int(total),
            "onnx": onnx_info,
            "torch": torch.__version__,
            "checks": checks,
            **(extra or {}),
        }
        files = {
            name: {"what": MODEL_FILES[name], "sha256": file_sha256(tmp / name)}
            for name in ("model.ts", "model.onnx", "model.pt")
        }
        config["files"] = files
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if card is not None:
            card_dict = card(config) if callable(card) else card
            card_dict.setdefault("export", {})
            card_dict["export"] = {
                **card_dict["export"],
                "files": files,
                "onnx": onnx_info,
                "checks": checks,
            }
            (tmp / "model_card.json").write_text(json.dumps(card_dict, indent=2, default=str))
            (tmp / "model_card.md").write_text(render_card(card_dict))
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        for f in tmp.glob("*"):
            f.unlink(missing_ok=True)
        tmp.rmdir()
    return config


def train_for_export(
    spec: Any,
    dataset: Any,
    *,
    ensemble: bool = False,
    stop: str = "inner",
    log: Callable[[str], None] | None = None,
) -> tuple[CxrModel | CxrEnsemble, list[dict] | None]:
    """The model an export ships, trained on `dataset`: the trial's configuration retrained on
    all of it (`stop`: "cv_epochs", as many epochs as its cross-validation scored; "inner",
    stopped by an inner split as each fold was — `fit_full`), or with `ensemble` its K fold
    models (the trial's own splits, `fit_folds`) averaged, with each fold's metrics."""
    from automl_cxr.engine import fit_folds, fit_full

    if ensemble:
        members, folds = fit_folds(dataset, spec.model, spec.train, log=log)
        ens = CxrEnsemble(members)
        ens.fold_metrics = folds  # for the card, when the model is handed to export_trial
        return ens, folds
    # "cv_epochs" with early stopping: the median epoch its folds chose, recorded by the search
    cv = stop == "cv_epochs" and spec.train.early_stopping
    cv_epochs = spec.user_attrs.get("full_fit_epochs") if cv else None
    model = fit_full(
        dataset,
        spec.model,
        spec.train,
        epochs=int(cv_epochs) if cv_epochs else None,
        stop=stop,
        log=log,
    )
    return model, None


def deployable(
    model: Any, spec: Any, dataset: Any, temperature: float | None = None
) -> tuple[Any, int, dict[str, Any]]:
    """(the module every exported graph computes, its input resolution, config extras): the
    temperature baked in (softmax(logits / T)) and the roi/intensity levers as its first layer
    (input then at the canvas resolution)."""
    if temperature is not None:
        model = TemperatureScaled(model, temperature)
    pp_spec, pre = preprocess_for(spec.train, Path(dataset.root).parent, spec.resolution)
    if pre is None:
        return model, spec.resolution, {}
    record = preprocess_record(pp_spec, pre, spec.resolution)
    return Preprocessed(pre, model), CANVAS, {"preprocess": record}


def export_trial(
    spec: Any,
    dataset: Any,
    out_dir: str | Path,
    *,
    model: CxrModel | CxrEnsemble | None = None,
    diagnostics: dict[str, Any] | None = None,
    onnx_exporter: str = "auto",
    ensemble: bool = False,
    temperature: float | None = None,
    card_extra: dict[str, Any] | None = None,
    config_extra: dict[str, Any] | None = None,
    seen_images: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a study trial's configuration with its model card: retrained on all its training
    data (`fit_full`), or with `ensemble` its K cross-validation fold models (`fit_folds`: the
    trial's own splits) averaged, unless a trained `model` is given. Also writes
    `training_images.sha256` (the file hashes of the training images and of `seen_images`,
    e.g. a calibration holdout, for leakage checks of external sets; no pixels)."""
    folds: list[dict] | None = None
    if model is None:
        model, folds = train_for_export(spec, dataset, ensemble=ensemble, log=log)
    training_info = dict(getattr(model, "training_info", None) or {})
    if isinstance(model, CxrEnsemble) and folds is None:
        folds = getattr(model, "fold_metrics", None) or [{} for _ in range(len(model))]
    model, resolution, pp_extra = deployable(model, spec, dataset, temperature)
    total, trainable = model.param_counts()
    roots = source_roots(dataset.manifest)

    def make_card(config: dict[str, Any]) -> dict[str, Any]:
        return build_card(
            spec,
            dataset,
            diagnostics=diagnostics,
            model_info={"params_total": int(total), "params_trainable": int(trainable)},
            ensemble_folds=folds,
            training_info=training_info,
            extra=card_extra,
            input_resolution=resolution,
            preprocess=pp_extra.get("preprocess"),
        )

    config = export_model(
        model,
        out_dir,
        classes=spec.classes,
        resolution=resolution,
        train_config=spec.train.to_dict(),
        positive=spec.positive,
        card=make_card,
        extra={
            "study": spec.describe(),
            "training_data": {
                "dataset": spec.dataset,
                "hash": dataset.hash,
                "manifest_hash": dataset.meta.get("subset_of") or dataset.hash,
                "images": len(dataset),
                "sources": roots,
            },
            **pp_extra,
            **(config_extra or {}),
        },
        onnx_exporter=onnx_exporter,
    )
    shas = sorted(set(dataset.manifest["sha256"].astype(str)) | set(seen_images))
    (Path(out_dir) / "training_images.sha256").write_text("\n".join(shas) + "\n")
    return config


def source_roots(manifest: Any) -> dict[str, dict[str, Any]]:
    """Per source: image count and the deepest folder holding all its images (used to tell
    whether an 'external' set really comes from elsewhere)."""
    out: dict[str, dict[str, Any]] = {}
    for src, rows in manifest.groupby("source"):
        dirs = [str(Path(p).parent) for p in rows["path"]]
        try:
            root = os.path.commonpath(dirs) if dirs else ""
        except ValueError:
            root = ""
        out[str(src)] = {"images": len(rows), "root": root}
    return out
