"""Control run: the same configuration trained and evaluated with the central lung field hidden.

A model that looks at the lungs should fall towards chance when they are blanked out; one that
still scores high is reading something else (the source's markers, collimation, patient size
or age), i.e. it has learned a shortcut.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from automl_cxr._numbers import finite_or_nan
from automl_cxr.data import PreparedDataset
from automl_cxr.engine import TrainConfig, corrected_paired_ttest, run_trial
from automl_cxr.errors import ConfigError
from automl_cxr.models import ModelConfig

__all__ = [
    "CONTROL_METRICS",
    "FILLS",
    "blank_center",
    "check_blank",
    "blank_box",
    "blanked_dataset",
    "control_run",
    "control_verdict",
]

FILLS = ("mean", "zero")
CONTROL_METRICS = ("balanced_accuracy", "auc")


def check_blank(fraction: float, fill: str | int) -> None:
    """ConfigError unless 0 < fraction < 1 and fill is 'mean', 'zero' or a gray value."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ConfigError(f"blank fraction must be a number in (0, 1), but got {fraction!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"blank fraction must be in (0, 1), but got fraction={fraction}")
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ConfigError(
                f"fill must be one of {', '.join(FILLS)} or a gray value 0..255, "
                f"but got fill={fill!r}"
            )
    elif isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise ConfigError(f"fill must be 'mean', 'zero' or 0..255, but got fill={fill!r}")


def blank_box(height: int, width: int, fraction: float = 0.6) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the centred `fraction` x `fraction` rectangle."""
    bh = max(1, int(round(height * fraction)))
    bw = max(1, int(round(width * fraction)))
    top, left = (height - bh) // 2, (width - bw) // 2
    return top, top + bh, left, left + bw


def blank_center(images: np.ndarray, fraction: float = 0.6, fill: str | int = "mean") -> np.ndarray:
    """A copy of `images` ((H, W) or (N, H, W), uint8) with the centred rectangle covering
    `fraction` of each side set to `fill`: "mean" (each image's own mean gray value, so the
    overall brightness is kept), "zero", or a gray value 0..255. The border is untouched."""
    check_blank(fraction, fill)
    arr = np.array(images, copy=True)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3:
        raise ConfigError(f"images must have shape (H, W) or (N, H, W), but got {arr.shape}")
    top, bottom, left, right = blank_box(arr.shape[1], arr.shape[2], fraction)
    if fill == "mean":
        means = arr.reshape(len(arr), -1).mean(axis=1)
        values = np.rint(means).astype(arr.dtype)
        arr[:, top:bottom, left:right] = values[:, None, None]
    else:
        arr[:, top:bottom, left:right] = 0 if fill == "zero" else fill
    return arr[0] if single else arr


def blanked_dataset(
    dataset: PreparedDataset, fraction: float = 0.6, fill: str | int = "mean"
) -> PreparedDataset:
    """A view of `dataset` whose `images(size)` have the central field blanked (after resizing
    to `size`). It has its own content hash, so frozen-feature caches never mix the two."""
    check_blank(fraction, fill)
    parent = dataset
    tag = f"blank-center-{float(fraction):g}-{fill}"
    meta = {
        **dataset.meta,
        "manifest_hash": hashlib.sha256(f"{dataset.hash}:{tag}".encode()).hexdigest(),
        "control": {"of": dataset.hash, "blank_fraction": float(fraction), "fill": fill},
    }

    class _Blanked(PreparedDataset):
        def images(self, size: int, *, progress=None) -> np.ndarray:
            if size not in self._images:
                base = np.asarray(parent.images(size, progress=progress))
                self._images[size] = blank_center(base, fraction, fill)
            return self._images[size]

    return _Blanked(dataset.root, dataset.manifest.copy(), meta)


def _chance(metric: str, n_classes: int) -> float:
    return 0.5 if metric == "auc" else 1.0 / n_classes


def control_verdict(
    original: dict[str, Any], control: dict[str, Any], chance: float
) -> tuple[str, str]:
    """(verdict, plain-language message) from the original and control summaries of one metric
    (each ``{"mean", "ci_low", "ci_high"}``, CIs over folds).

    Verdicts: ``likely_shortcut`` (the control keeps >= 75 % of the original's margin over
    chance and its CI stays above chance), ``partial`` (it loses much of it but stays above
    chance), ``lungs_matter`` (it falls to about chance), ``inconclusive`` (the original itself
    is within 0.1 of chance).
    """
    o, c = finite_or_nan(original.get("mean")), finite_or_nan(control.get("mean"))
    lo, hi = finite_or_nan(control.get("ci_low")), finite_or_nan(control.get("ci_high"))
    c_lo = c if math.isnan(lo) else lo
    c_ci = f" (95% CI {lo:.3f}-{hi:.3f})" if not math.isnan(lo) else ""
    if math.isnan(o) or math.isnan(c):
        return "inconclusive", "the original or the control score is missing: no verdict"
    gain_o, gain_c = o - chance, c - chance
    if gain_o < 0.1:
        return (
            "inconclusive",
            f"the configuration scores {o:.3f} with the lungs visible, barely above chance "
            f"({chance:.3f}); with them hidden it scores {c:.3f}. The control cannot tell what "
            "the model looks at: train a stronger configuration first",
        )
    if c_lo > chance and gain_c >= 0.75 * gain_o:
        return (
            "likely_shortcut",
            f"still scores {c:.3f}{c_ci} with the central lung field hidden, against {o:.3f} "
            f"with it visible (chance {chance:.3f}): likely shortcut. The model relies on cues "
            "outside the lungs (image source, markers, collimation, patient size or age)",
        )
    if c_lo > chance or gain_c >= 0.5 * gain_o:
        return (
            "partial",
            f"drops from {o:.3f} to {c:.3f}{c_ci} with the central lung field hidden but stays "
            f"above chance ({chance:.3f}): part of the signal comes from outside the lungs",
        )
    return (
        "lungs_matter",
        f"falls from {o:.3f} to {c:.3f}{c_ci} (chance {chance:.3f}) with the central lung "
        "field hidden: the score depends on the lung field",
    )


def _metric_summary(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    m = (summary.get("metrics") or {}).get(metric) or {}
    return {
        "mean": m.get("mean"),
        "ci_low": m.get("ci_low"),
        "ci_high": m.get("ci_high"),
        "folds": list(m.get("folds") or []),
    }


def control_run(
    dataset: PreparedDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    original: dict[str, Any] | None = None,
    metric: str = "balanced_accuracy",
    fraction: float = 0.6,
    fill: str | int = "mean",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Retrain and evaluate the configuration with `run_trial` (same folds, same seed) on the
    lung-blanked images, and compare with the original.

    `original` is the original trial's fold summary (``summarize_folds`` output, e.g. the
    ``metrics.summary`` user attribute of a study trial); None runs the original too.
    Returns ``{"metric", "chance", "fraction", "fill", "original", "control", "paired",
    "control_by_source", "verdict", "message"}``, each score ``{"mean", "ci_low", "ci_high",
    "folds"}`` over folds.
    """
    if metric not in CONTROL_METRICS:
        raise ConfigError(
            f"control metric must be one of {', '.join(CONTROL_METRICS)}, but got {metric!r}"
        )
    check_blank(fraction, fill)
    if original is None or metric not in (original.get("metrics") or {}):
        original = run_trial(dataset, model_config, train_config, metric=metric, log=log).summary
    blanked = blanked_dataset(dataset, fraction, fill)
    result = run_trial(blanked, model_config, train_config, metric=metric, log=log)
    orig = _metric_summary(original, metric)
    ctrl = _metric_summary(result.summary, metric)
    chance = _chance(metric, len(dataset.classes))
    paired = None
    if orig["folds"] and len(orig["folds"]) == len(ctrl["folds"]):
        # the same folds, whose training sets overlap: the corrected resampled t-test
        paired = corrected_paired_ttest(
            [finite_or_nan(v) for v in orig["folds"]],
            [finite_or_nan(v) for v in ctrl["folds"]],
            n_train=[f["n_train"] for f in result.folds],
            n_val=[f["n_val"] for f in result.folds],
        )
    verdict, message = control_verdict(orig, ctrl, chance)
    by_source = {
        src: {
            "n": m.get("n"),
            "accuracy": m.get("accuracy"),
            metric: m.get(metric),
        }
        for src, m in result.by_source.items()
    }
    return {
        "metric": metric,
        "chance": chance,
        "fraction": float(fraction),
        "fill": fill,
        "original": orig,
        "control": ctrl,
        "paired": paired,
        "control_by_source": by_source,
        "verdict": verdict,
        "message": message,
    }
