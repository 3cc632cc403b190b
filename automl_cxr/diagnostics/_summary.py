"""Per-source metrics of a trial, and everything `diagnose` reports, as plain dicts."""

from __future__ import annotations

from typing import Any

from automl_cxr._numbers import finite_or_none
from automl_cxr.data import PreparedDataset
from automl_cxr.diagnostics._source import source_diagnostics

__all__ = ["diagnose_dataset", "per_source_table"]


def per_source_table(by_source: dict[str, Any] | None) -> dict[str, Any]:
    """Rows of the out-of-fold metrics per image source (a trial's ``metrics.by_source``).

    Each row: ``source``, ``n``, ``classes_present`` (classes with images from that source),
    ``accuracy``, ``balanced_accuracy`` (over the classes present), ``auc`` (None when the
    source holds a single class), ``sensitivity`` per class present. ``note`` explains the
    reading when a source holds a single class (the paper's recipes: all COVID-19 from one).
    """
    rows: list[dict[str, Any]] = []
    single = []
    for src, m in sorted((by_source or {}).items()):
        per_class = m.get("per_class") or {}
        present = [c for c, v in per_class.items() if (v.get("support") or 0) > 0]
        if len(present) == 1:
            single.append((src, present[0]))
        rows.append(
            {
                "source": str(src),
                "n": int(m.get("n") or 0),
                "classes_present": present,
                "accuracy": finite_or_none(m.get("accuracy")),
                "balanced_accuracy": finite_or_none(m.get("balanced_accuracy")),
                "auc": finite_or_none(m.get("auc")),
                "sensitivity": {
                    c: finite_or_none(per_class[c].get("sensitivity")) for c in present
                },
            }
        )
    note = None
    if single:
        note = (
            "; ".join(f"source {s!r} holds only {c!r} images" for s, c in single)
            + ": within such a source only that class's sensitivity can be measured, and a "
            "model that recognises the source scores perfectly there"
        )
    return {"rows": rows, "note": note}


def diagnose_dataset(
    dataset: PreparedDataset,
    *,
    resolution: int = 64,
    by_source: dict[str, Any] | None = None,
    probe_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Source-label alignment, the image-based source probe and (given a trial's
    ``metrics.by_source``) the per-source metrics: ``{"dataset", "dataset_hash", "alignment",
    "probe", "warning", "warnings", "by_source"}``."""
    out = source_diagnostics(dataset, resolution=resolution, size=probe_size, seed=seed)
    out["by_source"] = per_source_table(by_source) if by_source is not None else None
    return out
