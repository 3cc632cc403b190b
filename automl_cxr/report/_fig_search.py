"""The search's figures: how the searched choices (backbone, frozen depth, head, learning
rate) relate to the score, the optimisation history, importances and the score-cost front."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from automl_cxr.report._data import ReportData
from automl_cxr.report._figstyle import (
    FIGURE_TITLES,
    HOVER,
    STATE_COLOURS,
    ci_error,
    colour_map,
    integer_axis,
    styled,
)
from automl_cxr.report._plotdata import pareto_flags


def distribution_figure(data: ReportData, by: str, title: str, xlabel: str) -> go.Figure:
    """Box of the ranked scores per group, every trial drawn on top with its hover."""
    board = data.board
    fig = go.Figure()
    order = [str(v) for v in dict.fromkeys(board[by].astype(str))]
    for name in order:
        sub = board[board[by].astype(str) == name]
        fig.add_trace(
            go.Box(
                y=sub["value"],
                x=[name] * len(sub),
                name=name,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                hovertext=sub["hover"],
                hovertemplate=HOVER,
                marker={"size": 8},
                showlegend=False,
            )
        )
    styled(fig, title, xaxis_title=xlabel, yaxis_title=data.metric)
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    return fig


def frozen_figure(data: ReportData) -> go.Figure:
    board = data.board
    fig = go.Figure()
    colours = colour_map(board["backbone"].astype(str))
    for name, colour in colours.items():
        sub = board[board["backbone"].astype(str) == name]
        x = (sub["frozen_stages"] / sub["num_stages"]).where(
            sub["num_stages"] > 0, sub["frozen_fraction"]
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=sub["value"],
                mode="markers",
                name=name,
                marker={"color": colour, "size": 10, "line": {"width": 1, "color": "white"}},
                error_y=ci_error(sub),
                hovertext=sub["hover"],
                hovertemplate=HOVER,
            )
        )
    styled(
        fig,
        FIGURE_TITLES["frozen"],
        xaxis_title="frozen stages / stages (0 = fine-tune all, 1 = train the head only)",
        yaxis_title=data.metric,
    )
    fig.update_xaxes(range=[-0.05, 1.05])
    return fig


def lr_figure(data: ReportData) -> go.Figure:
    board = data.board[data.board["lr"].notna() & (data.board["lr"] > 0)]
    fig = go.Figure()
    for name, colour in colour_map(board["backbone"].astype(str)).items():
        sub = board[board["backbone"].astype(str) == name]
        fig.add_trace(
            go.Scatter(
                x=sub["lr"],
                y=sub["value"],
                mode="markers",
                name=name,
                marker={"color": colour, "size": 10},
                error_y=ci_error(sub),
                hovertext=sub["hover"],
                hovertemplate=HOVER,
            )
        )
    styled(
        fig, FIGURE_TITLES["lr"], xaxis_title="learning rate (log scale)", yaxis_title=data.metric
    )
    fig.update_xaxes(type="log")
    return fig


def parallel_figure(data: ReportData) -> go.Figure:
    board = data.board
    dims = []
    for key in ("backbone", "frozen_fraction", "head", "lr"):
        if key not in board or board[key].isna().all():
            continue
        col = board[key]
        if key in ("backbone", "head"):
            cats = list(dict.fromkeys(col.astype(str)))
            dims.append(
                {
                    "label": key,
                    "values": [cats.index(v) for v in col.astype(str)],
                    "tickvals": list(range(len(cats))),
                    "ticktext": cats,
                }
            )
        elif key == "lr":
            dims.append({"label": "log10(lr)", "values": np.log10(col.astype(float)).tolist()})
        else:
            dims.append({"label": key, "values": col.astype(float).tolist()})
    # The other sampled parameters, numeric ones as they are, categorical ones as codes.
    extra = sorted(
        {k for p in board["params"] for k in p} - {"backbone", "frozen_fraction", "head", "lr"}
    )
    for key in extra:
        vals = [p.get(key) for p in board["params"]]
        if all(v is None for v in vals):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in vals):
            numeric = [float(v) if v is not None else math.nan for v in vals]
            lo = np.nanmin(numeric)
            dims.append({"label": key, "values": [lo if math.isnan(v) else v for v in numeric]})
        else:
            cats = list(dict.fromkeys(str(v) for v in vals))
            dims.append(
                {
                    "label": key,
                    "values": [cats.index(str(v)) for v in vals],
                    "tickvals": list(range(len(cats))),
                    "ticktext": cats,
                }
            )
    dims.append({"label": data.metric, "values": board["value"].tolist()})
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": board["value"].tolist(),
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": {"text": data.metric}},
            },
            dimensions=dims,
        )
    )
    styled(fig, FIGURE_TITLES["parallel"], height=460)
    fig.update_layout(margin={"l": 80, "r": 80, "t": 90, "b": 40})
    return fig


def importance_figure(data: ReportData) -> go.Figure:
    imp = data.importances.iloc[::-1]
    fig = go.Figure(
        go.Bar(
            x=imp["importance"],
            y=imp["param"],
            orientation="h",
            text=[f"{v:.2f}" if v >= 0.01 else "<0.01" for v in imp["importance"]],
            textposition="outside",
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    title = FIGURE_TITLES["importance"]
    if data.importance_note:
        title += f"<br><sup>{data.importance_note}</sup>"
    if imp.empty:
        fig.add_annotation(
            text="not available", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper"
        )
    styled(
        fig,
        title,
        height=max(300, 60 + 32 * len(imp)),
        xaxis_title=f"importance for {data.metric} (sums to 1)",
    )
    return fig


def history_figure(data: ReportData) -> go.Figure:
    h = data.history
    fig = go.Figure()
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        sub = h[h["state"] == state]
        if sub.empty:
            continue
        y = sub["value"] if state == "COMPLETE" else [None] * len(sub)
        if state != "COMPLETE":
            # Not scored: drawn along the bottom so they are counted, not ranked.
            low = h["value"].min()
            y = [low if not (isinstance(low, float) and math.isnan(low)) else 0] * len(sub)
        fig.add_trace(
            go.Scatter(
                x=sub["number"],
                y=y,
                mode="markers",
                name=state.lower(),
                marker={
                    "color": STATE_COLOURS[state],
                    "size": 9,
                    "symbol": "circle" if state == "COMPLETE" else "x",
                },
                hovertext=sub["hover"],
                hovertemplate=HOVER,
            )
        )
    fig.add_trace(
        go.Scatter(
            x=h["number"],
            y=h["best_so_far"],
            mode="lines",
            name="best so far",
            line={"shape": "hv", "color": "#d62728", "width": 2},
            connectgaps=True,
            hovertemplate="best so far after trial %{x}: %{y:.4f}<extra></extra>",
        )
    )
    styled(fig, FIGURE_TITLES["history"], xaxis_title="trial", yaxis_title=data.metric)
    integer_axis(fig, h["number"].max() if len(h) else 0)
    return fig


def pareto_figure(data: ReportData) -> go.Figure:
    board = data.board
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("vs latency", "vs model size"), horizontal_spacing=0.08
    )
    for col, (cost, label, axis) in enumerate(
        (
            ("latency_ms", "latency, ms per image (batch 1)", "linear"),
            ("params_total", "parameters (log scale)", "log"),
        ),
        start=1,
    ):
        on = np.array(pareto_flags(board["value"], board[cost]))
        off = board[~on]
        front = board[on].sort_values(cost)
        fig.add_trace(
            go.Scatter(
                x=off[cost],
                y=off["value"],
                mode="markers",
                name="dominated",
                marker={"color": "#9ecae1", "size": 8},
                hovertext=off["hover"],
                hovertemplate=HOVER,
                showlegend=col == 1,
                legendgroup="off",
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=front[cost],
                y=front["value"],
                mode="lines+markers",
                name="Pareto front",
                line={"shape": "hv", "color": "#d62728"},
                marker={"size": 10, "color": "#d62728"},
                hovertext=front["hover"],
                hovertemplate=HOVER,
                showlegend=col == 1,
                legendgroup="front",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text=label, type=axis, row=1, col=col)
    fig.update_yaxes(title_text=data.metric, row=1, col=1)
    return styled(fig, FIGURE_TITLES["pareto"], height=440)
