"""Shortcut diagnostics beyond the manifest: an image-based source probe, the lung-blanked
control run and per-source metrics. Every function returns plain dicts; the CLI only formats.

    >>> from automl_cxr.diagnostics import source_diagnostics, blank_center, control_run
    >>> d = source_diagnostics(dataset, resolution=64)   # alignment + probe + warning
    >>> d["probe"]["auc"], d["warning"]
"""

from __future__ import annotations

from automl_cxr.diagnostics._control import (
    CONTROL_METRICS,
    FILLS,
    blank_box,
    blank_center,
    blanked_dataset,
    check_blank,
    control_run,
    control_verdict,
)
from automl_cxr.diagnostics._source import (
    PROBE_WARN_AUC,
    probe_thumbnails,
    shortcut_warning,
    source_diagnostics,
    source_probe,
)
from automl_cxr.diagnostics._summary import diagnose_dataset, per_source_table

__all__ = [
    "CONTROL_METRICS",
    "FILLS",
    "PROBE_WARN_AUC",
    "blank_box",
    "blank_center",
    "blanked_dataset",
    "check_blank",
    "control_run",
    "control_verdict",
    "diagnose_dataset",
    "per_source_table",
    "probe_thumbnails",
    "shortcut_warning",
    "source_diagnostics",
    "source_probe",
]
