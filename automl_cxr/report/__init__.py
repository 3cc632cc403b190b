"""`automl-cxr report`: what a person reads from a study.

Two layers. The data side computes the information as plain data, tested without drawing:
:mod:`._records` (the trials as one table), :mod:`._ranking` (leaderboard, paired test against
the best, best per group), :mod:`._paper` (the paper-style table), :mod:`._plotdata` (what each
figure shows), assembled into :class:`ReportData` by :mod:`._data`. The rendering side:
:mod:`._figures` draws it with Plotly, :mod:`._html` and :mod:`._tables` render the page and
the exports. :func:`make_report` does all of it for a storage path or URL.

Files of a report folder: ``index.html`` (self-contained interactive page), ``report.md``,
``leaderboard.csv`` / ``leaderboard.json``, ``trials.csv`` (every trial, any state),
``best_per_group.csv``, ``paper_table.csv`` / ``paper_table.md``, and ``compare.csv`` with
``--compare``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from automl_cxr.errors import AutomlCxrError
from automl_cxr.report._data import LEADERBOARD_COLUMNS, ReportData, build_report_data
from automl_cxr.report._figures import FIGURE_TITLES, build_figures
from automl_cxr.report._files import (
    paper_table_markdown,
    report_files,
    report_markdown,
    write_files,
)
from automl_cxr.report._html import render_html
from automl_cxr.report._oofdata import DEFAULT_OPERATING_POINT
from automl_cxr.report._paper import PAPER_KEYS, paper_caveat, paper_table
from automl_cxr.report._plotdata import (
    confusion_data,
    history_frame,
    learning_curves,
    param_importances,
    pareto_flags,
    roc_data,
)
from automl_cxr.report._ranking import (
    DEFAULT_ALPHA,
    best_per_group,
    compare_best_per_backbone,
    leaderboard,
    not_worse_than_best,
)
from automl_cxr.report._records import STATES, resolve_metric, state_counts, trial_records
from automl_cxr.report._tables import markdown_table
from automl_cxr.study import load_study, storage_url

__all__ = [
    "DEFAULT_ALPHA",
    "FIGURE_TITLES",
    "LEADERBOARD_COLUMNS",
    "PAPER_KEYS",
    "STATES",
    "ReportData",
    "best_per_group",
    "build_figures",
    "build_report_data",
    "compare_best_per_backbone",
    "confusion_data",
    "default_out_dir",
    "history_frame",
    "leaderboard",
    "learning_curves",
    "load_report",
    "load_study",
    "make_report",
    "markdown_table",
    "not_worse_than_best",
    "paper_caveat",
    "paper_table",
    "paper_table_markdown",
    "param_importances",
    "pareto_flags",
    "render_html",
    "report_files",
    "report_markdown",
    "resolve_metric",
    "roc_data",
    "state_counts",
    "trial_records",
    "write_files",
]


def default_out_dir(study_name: str) -> Path:
    """`dashboards/<study_name>/` under the current directory (unsafe characters replaced)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name) or "study"
    return Path("dashboards") / safe


def load_report(
    storage: str,
    *,
    study_name: str | None = None,
    metric: str | None = None,
    top: int = 10,
    alpha: float = DEFAULT_ALPHA,
    compare: str | None = None,
    compare_study_name: str | None = None,
    operating_point: str | None = DEFAULT_OPERATING_POINT,
) -> ReportData:
    """Open the study (and the one to compare with) and compute the report's data."""
    study = load_study(storage, study_name)
    data = build_report_data(
        study,
        metric=metric,
        top=top,
        alpha=alpha,
        storage=storage_url(storage),
        operating_point=operating_point,
    )
    if compare is not None:
        other = load_study(compare, compare_study_name)
        try:
            odata = build_report_data(
                other, metric=data.metric, top=top, alpha=alpha, storage=storage_url(compare)
            )
        except AutomlCxrError as exc:
            raise type(exc)(f"--compare study {other.study_name!r}: {exc}") from None
        name = other.study_name
        if name == data.study_name:
            name = f"{name} ({storage_url(compare)})"
        data.compare = compare_best_per_backbone(data.board, odata.board)
        data.compare_name = name
    return data


def make_report(
    storage: str,
    *,
    study_name: str | None = None,
    metric: str | None = None,
    out: str | Path | None = None,
    top: int = 10,
    alpha: float = DEFAULT_ALPHA,
    compare: str | None = None,
    compare_study_name: str | None = None,
    html: bool = True,
    operating_point: str | None = DEFAULT_OPERATING_POINT,
) -> tuple[ReportData, list[Path]]:
    """Compute, render and write a report folder; returns the data and the files written.

    Everything is rendered in memory before the first file is written, and the files are
    written all or none (see :func:`write_files`).
    """
    data = load_report(
        storage,
        study_name=study_name,
        metric=metric,
        top=top,
        alpha=alpha,
        compare=compare,
        compare_study_name=compare_study_name,
        operating_point=operating_point,
    )
    page = render_html(data, build_figures(data)) if html else None
    files = report_files(data, page)
    target = Path(out) if out is not None else default_out_dir(data.study_name)
    return data, write_files(target, files)


class _CallableReportModule(types.ModuleType):
    """`automl_cxr.report` is both this subpackage and the Python API's `report(study)`: once
    the subpackage is imported, Python binds `automl_cxr.report` to it, so calling the module
    calls the API function (`import automl_cxr as ac; ac.report(study)` works either way)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from automl_cxr.api import report

        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableReportModule
