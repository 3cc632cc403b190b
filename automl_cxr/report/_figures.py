"""Plotly figures of the report, drawn from :class:`~automl_cxr.report.ReportData` only.

Each builder (the search's in :mod:`._fig_search`, the top trials' in :mod:`._fig_models`, the
shared look in :mod:`._figstyle`) maps columns of the data side onto traces and computes nothing
of its own, so the numbers are tested on the data side (:mod:`._data` and the modules it
assembles) and the figure modules only decide the look; this one assembles them in page order.
Every trial marker carries the trial's hover text (number, score with CI, costs, every
parameter).
"""

from __future__ import annotations

import plotly.graph_objects as go

from automl_cxr.report._data import ReportData
from automl_cxr.report._fig_models import (
    compare_figure,
    confusion_figure,
    curves_figure,
    gap_figure,
    reliability_figure,
    roc_figure,
)
from automl_cxr.report._fig_search import (
    distribution_figure,
    frozen_figure,
    history_figure,
    importance_figure,
    lr_figure,
    parallel_figure,
    pareto_figure,
)
from automl_cxr.report._figstyle import FIGURE_TITLES

__all__ = ["FIGURE_TITLES", "build_figures"]


def build_figures(data: ReportData) -> dict[str, go.Figure]:
    """Figure key → Plotly figure, in page order (keys of :data:`FIGURE_TITLES`). Figures whose
    data is missing (no ROC recorded, no comparison asked for) are left out."""
    figs: dict[str, go.Figure] = {
        "backbones": distribution_figure(data, "backbone", FIGURE_TITLES["backbones"], "backbone"),
        "frozen": frozen_figure(data),
        "heads": distribution_figure(data, "head", FIGURE_TITLES["heads"], "head"),
    }
    if data.board["lr"].notna().any():
        figs["lr"] = lr_figure(data)
    figs["parallel"] = parallel_figure(data)
    figs["importance"] = importance_figure(data)
    figs["history"] = history_figure(data)
    figs["pareto"] = pareto_figure(data)
    if data.confusions:
        figs["confusion"] = confusion_figure(data)
    if data.rocs:
        figs["roc"] = roc_figure(data)
    if data.oof is not None and data.oof.reliability:
        figs["reliability"] = reliability_figure(data)
    figs["curves"] = curves_figure(data)
    if data.compare is not None and not data.compare.empty:
        figs["compare"] = compare_figure(data)
    if data.gap is not None and not data.gap.empty:
        figs["gap"] = gap_figure(data)
    return figs
