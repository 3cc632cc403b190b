"""Plotly figures of the report, drawn from :class:`~automl_cxr.report.ReportData` only.

Each builder maps columns of the data side onto traces and computes nothing of its own, so the
numbers are tested on the data side (:mod:`._data` and the modules it assembles) and this module
only decides the look. Every trial marker carries the trial's hover text (number, score with CI,
costs, every parameter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from automl_cxr.report._data import ReportData
from automl_cxr.report._plotdata import pareto_flags

__all__ = ["FIGURE_TITLES", "build_figures"]

_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_STATE_COLOURS = {
    "COMPLETE": "#1f77b4",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#2ca02c",
    "WAITING": "#7f7f7f",
}
_HOVER = "%{hovertext}<extra></extra>"

FIGURE_TITLES = {
    "backbones": "Backbone comparison",
    "frozen": "Effect of frozen depth",
    "heads": "Effect of head design",
    "lr": "Learning rate vs score",
    "parallel": "Parallel coordinates",
    "importance": "Hyperparameter importance",
    "history": "Optimization history",
    "pareto": "Pareto front: score vs cost",
    "confusion": "Confusion matrices of the top trials",
    "roc": "ROC curves of the top trials",
    "reliability": "Reliability of the top trials",
    "curves": "Learning curves (intermediate values)",
    "compare": "Study comparison: best per backbone",
    "gap": "Generalisation gap: cross-validation vs external sets",
}
"""Figure key → section title, in page order."""


def _layout(fig: go.Figure, title: str, *, height: int = 420, **kw) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        hoverlabel={"align": "left"},
        **kw,
    )
    return fig


def _integer_axis(fig: go.Figure, largest: float) -> None:
    """Whole-number ticks only (trial numbers, steps), about ten of them at most."""
    largest = (
        0
        if largest is None or (isinstance(largest, float) and math.isnan(largest))
        else int(largest)
    )
    fig.update_xaxes(tickmode="linear", tick0=0, dtick=max(1, math.ceil(largest / 10)))


def _colour_map(values: Sequence) -> dict:
    return {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(dict.fromkeys(values))}


def _ci_error(frame: pd.DataFrame) -> dict:
    up = (frame["ci_high"] - frame["value"]).clip(lower=0)
    down = (frame["value"] - frame["ci_low"]).clip(lower=0)
    return {
        "type": "data",
        "symmetric": False,
        "array": up.fillna(0).tolist(),
        "arrayminus": down.fillna(0).tolist(),
        "thickness": 1,
        "width": 3,
    }


def _jitter(n: int, seed: int = 0, width: float = 0.15) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-width, width, n)


def _distribution(data: ReportData, by: str, title: str, xlabel: str) -> go.Figure:
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
                hovertemplate=_HOVER,
                marker={"size": 8},
                showlegend=False,
            )
        )
    _layout(fig, title, xaxis_title=xlabel, yaxis_title=data.metric)
    fig.update_xaxes(categoryorder="array", categoryarray=order)
    return fig


def _frozen(data: ReportData) -> go.Figure:
    board = data.board
    fig = go.Figure()
    colours = _colour_map(board["backbone"].astype(str))
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
                error_y=_ci_error(sub),
                hovertext=sub["hover"],
                hovertemplate=_HOVER,
            )
        )
    _layout(
        fig,
        FIGURE_TITLES["frozen"],
        xaxis_title="frozen stages / stages (0 = fine-tune all, 1 = train the head only)",
        yaxis_title=data.metric,
    )
    fig.update_xaxes(range=[-0.05, 1.05])
    return fig


def _lr(data: ReportData) -> go.Figure:
    board = data.board[data.board["lr"].notna() & (data.board["lr"] > 0)]
    fig = go.Figure()
    for name, colour in _colour_map(board["backbone"].astype(str)).items():
        sub = board[board["backbone"].astype(str) == name]
        fig.add_trace(
            go.Scatter(
                x=sub["lr"],
                y=sub["value"],
                mode="markers",
                name=name,
                marker={"color": colour, "size": 10},
                error_y=_ci_error(sub),
                hovertext=sub["hover"],
                hovertemplate=_HOVER,
            )
        )
    _layout(
        fig, FIGURE_TITLES["lr"], xaxis_title="learning rate (log scale)", yaxis_title=data.metric
    )
    fig.update_xaxes(type="log")
    return fig


def _parallel(data: ReportData) -> go.Figure:
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
    _layout(fig, FIGURE_TITLES["parallel"], height=460)
    fig.update_layout(margin={"l": 80, "r": 80, "t": 90, "b": 40})
    return fig


def _importance(data: ReportData) -> go.Figure:
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
    _layout(
        fig,
        title,
        height=max(300, 60 + 32 * len(imp)),
        xaxis_title=f"importance for {data.metric} (sums to 1)",
    )
    return fig


def _history(data: ReportData) -> go.Figure:
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
                    "color": _STATE_COLOURS[state],
                    "size": 9,
                    "symbol": "circle" if state == "COMPLETE" else "x",
                },
                hovertext=sub["hover"],
                hovertemplate=_HOVER,
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
    _layout(fig, FIGURE_TITLES["history"], xaxis_title="trial", yaxis_title=data.metric)
    _integer_axis(fig, h["number"].max() if len(h) else 0)
    return fig


def _pareto(data: ReportData) -> go.Figure:
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
                hovertemplate=_HOVER,
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
                hovertemplate=_HOVER,
                showlegend=col == 1,
                legendgroup="front",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text=label, type=axis, row=1, col=col)
    fig.update_yaxes(title_text=data.metric, row=1, col=1)
    return _layout(fig, FIGURE_TITLES["pareto"], height=440)


def _confusion(data: ReportData) -> go.Figure:
    items = data.confusions
    n = max(1, len(items))
    titles = [f"#{c['rank']} trial {c['number']} ({c['backbone']})" for c in items] or [""]
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles, horizontal_spacing=0.06)
    for i, c in enumerate(items, start=1):
        m = np.asarray(c["matrix"], dtype=float)
        rows = m.sum(axis=1, keepdims=True)
        share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        text = [
            [f"{int(m[r, k])}<br>{share[r, k]:.0%}" for k in range(m.shape[1])]
            for r in range(m.shape[0])
        ]
        fig.add_trace(
            go.Heatmap(
                z=share,
                x=c["classes"],
                y=c["classes"],
                text=text,
                texttemplate="%{text}",
                colorscale="Blues",
                zmin=0,
                zmax=1,
                showscale=i == n,
                hovertemplate="true %{y}, predicted %{x}: %{text}<extra></extra>",
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="predicted", row=1, col=i)
        fig.update_yaxes(autorange="reversed", row=1, col=i, title_text="true" if i == 1 else None)
    return _layout(fig, FIGURE_TITLES["confusion"] + " (summed over folds)", height=400)


def _roc(data: ReportData) -> go.Figure:
    items = data.rocs
    points = {op["number"]: op for op in (data.oof.operating if data.oof else [])}
    n = max(1, len(items))
    titles = [f"#{c['rank']} trial {c['number']} ({c['backbone']})" for c in items] or [""]
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles, horizontal_spacing=0.05)
    labels = list(dict.fromkeys(lbl for c in items for lbl in c["curves"]))
    colours = _colour_map(labels)
    for i, c in enumerate(items, start=1):
        for label, curve in c["curves"].items():
            auc = curve["auc"]
            fig.add_trace(
                go.Scatter(
                    x=curve["fpr"],
                    y=curve["tpr"],
                    mode="lines",
                    name=label,
                    legendgroup=label,
                    showlegend=i == 1,
                    line={"color": colours[label]},
                    hovertemplate=f"{label} (AUC {auc:.3f})<br>FPR %{{x:.3f}}, TPR %{{y:.3f}}"
                    "<extra></extra>",
                ),
                row=1,
                col=i,
            )
        fig.add_trace(
            go.Scatter(
                x=[0, 1],
                y=[0, 1],
                mode="lines",
                showlegend=False,
                line={"dash": "dot", "color": "#aaa"},
                hoverinfo="skip",
            ),
            row=1,
            col=i,
        )
        op = points.get(c["number"])
        if op is not None:
            fig.add_trace(
                go.Scatter(
                    x=[op["fpr"]],
                    y=[op["sensitivity"]],
                    error_x={
                        "type": "data",
                        "symmetric": False,
                        "array": [op["specificity"] - op["specificity_ci_low"]],
                        "arrayminus": [op["specificity_ci_high"] - op["specificity"]],
                    },
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": [op["sensitivity_ci_high"] - op["sensitivity"]],
                        "arrayminus": [op["sensitivity"] - op["sensitivity_ci_low"]],
                    },
                    mode="markers",
                    marker={"symbol": "x", "size": 11, "color": "#000"},
                    name=f"operating point ({op['point']})",
                    legendgroup="op",
                    showlegend=i == 1,
                    hovertemplate=(
                        f"{op['positive']} ≥ {op['threshold']:.3f} ({op['point']})<br>"
                        f"sensitivity {op['sensitivity']:.3f} "
                        f"[{op['sensitivity_ci_low']:.3f}, {op['sensitivity_ci_high']:.3f}]<br>"
                        f"specificity {op['specificity']:.3f} "
                        f"[{op['specificity_ci_low']:.3f}, {op['specificity_ci_high']:.3f}]"
                        "<extra></extra>"
                    ),
                ),
                row=1,
                col=i,
            )
        fig.update_xaxes(title_text="false positive rate", range=[0, 1], row=1, col=i)
        fig.update_yaxes(
            range=[0, 1.02], row=1, col=i, title_text="true positive rate" if i == 1 else None
        )
    return _layout(fig, FIGURE_TITLES["roc"] + " (one vs rest, pooled out-of-fold)", height=400)


def _reliability(data: ReportData) -> go.Figure:
    """Top-label reliability (accuracy vs confidence per bin) of the top trials, with a
    Wilson 95 % interval per bin (the bin's count is in the hover)."""
    from scipy.stats import binomtest

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            name="perfect calibration",
            line={"dash": "dot", "color": "#aaa"},
            hoverinfo="skip",
        )
    )
    for i, r in enumerate(data.oof.reliability):
        lo, hi = [], []
        for acc, n in zip(r["accuracy"], r["count"], strict=True):
            ci = binomtest(int(round(acc * n)), int(n)).proportion_ci(method="wilson")
            lo.append(acc - ci.low)
            hi.append(ci.high - acc)
        fig.add_trace(
            go.Scatter(
                x=r["confidence"],
                y=r["accuracy"],
                mode="lines+markers",
                name=f"trial {r['number']} (ECE {r['ece']:.3f})",
                line={"color": _PALETTE[i % len(_PALETTE)]},
                error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                customdata=r["count"],
                hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} images"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="confidence (top-class probability)", range=[0, 1])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    return _layout(fig, FIGURE_TITLES["reliability"] + " (pooled out-of-fold, top label)")


def _curves(data: ReportData) -> go.Figure:
    lc = data.curves
    fig = go.Figure()
    ranked = set(data.board["number"].head(data.top))
    for i, (number, sub) in enumerate(lc.groupby("number", sort=True)):
        state = sub["state"].iloc[0]
        highlight = number in ranked
        xs: list = []
        ys: list = []
        texts: list = []
        prev_fold = None
        for r in sub.itertuples():
            fold = None if pd.isna(r.fold) else int(r.fold)
            if prev_fold is not None and fold != prev_fold:
                xs.append(None)  # a gap between folds: they are separate trainings
                ys.append(None)
                texts.append("")
            prev_fold = fold
            where = f"fold {fold}, epoch {int(r.epoch)}" if fold is not None else f"step {r.step}"
            xs.append(int(r.step))
            ys.append(r.value)
            texts.append(f"{r.hover}<br>{where}: {r.value:.4f}")
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                connectgaps=False,
                name=f"trial {number}" + ("" if state == "COMPLETE" else f" ({state.lower()})"),
                line={
                    "color": _PALETTE[i % len(_PALETTE)],
                    "width": 2.5 if highlight else 1.2,
                    "dash": "solid" if state == "COMPLETE" else "dot",
                },
                marker={"size": 5, "symbol": "circle" if state == "COMPLETE" else "x"},
                opacity=1.0 if highlight or state != "COMPLETE" else 0.6,
                showlegend=bool(highlight) or len(lc["number"].unique()) <= 20,
                hovertext=texts,
                hovertemplate=_HOVER,
            )
        )
    _integer_axis(fig, lc["step"].max() if len(lc) else 0)
    if lc.empty:
        fig.add_annotation(
            text="no intermediate values recorded",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
    _layout(
        fig,
        FIGURE_TITLES["curves"] + "<br><sup>step = fold × epochs + epoch, a gap between "
        "folds; solid = complete (thick: top trials), dotted = pruned / running</sup>",
        xaxis_title="step",
        yaxis_title=f"validation {data.metric}",
        height=460,
    )
    return fig


def _compare(data: ReportData) -> go.Figure:
    c = data.compare
    fig = go.Figure()
    names = (data.study_name, data.compare_name or "other")
    for tag, name, colour in (("a", names[0], _PALETTE[0]), ("b", names[1], _PALETTE[1])):
        v = c[f"{tag}_value"]
        fig.add_trace(
            go.Bar(
                x=c["backbone"],
                y=v,
                name=name,
                marker_color=colour,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (c[f"{tag}_ci_high"] - v).clip(lower=0).fillna(0).tolist(),
                    "arrayminus": (v - c[f"{tag}_ci_low"]).clip(lower=0).fillna(0).tolist(),
                },
                hovertext=[
                    f"{name}<br>{b}: trial {t}, {data.metric} = {x:.4f}"
                    if t is not None and not math.isnan(x)
                    else f"{name}<br>{b}: no trial"
                    for b, t, x in zip(c["backbone"], c[f"{tag}_trial"], v, strict=False)
                ],
                hovertemplate=_HOVER,
            )
        )
    _layout(
        fig,
        FIGURE_TITLES["compare"],
        barmode="group",
        yaxis_title=data.metric,
        xaxis_title="backbone",
    )
    return fig


def _gap(data: ReportData) -> go.Figure:
    """CV estimate (x) against the external figure (y) per trial and set, with the diagonal:
    a point below it is a trial whose cross-validation promised more than it delivered."""
    gap = data.gap
    fig = go.Figure()
    lo = float(np.nanmin([gap["cv_ci_low"].min(), gap["ext_ci_low"].min(), 0.5]))
    fig.add_trace(
        go.Scatter(
            x=[lo, 1.0],
            y=[lo, 1.0],
            mode="lines",
            line={"dash": "dash", "color": "#7f7f7f"},
            name="no gap (external = CV)",
            hoverinfo="skip",
        )
    )
    for i, (name, g) in enumerate(gap.groupby("external", sort=True)):
        fig.add_trace(
            go.Scatter(
                x=g["cv"],
                y=g["ext"],
                mode="markers",
                name=f"external: {name}",
                marker={"color": _PALETTE[i % len(_PALETTE)], "size": 9},
                error_x=_ci_error(g.rename(columns={"cv": "value", "cv_ci_low": "ci_low",
                                                    "cv_ci_high": "ci_high"})),
                error_y=_ci_error(g.rename(columns={"ext": "value", "ext_ci_low": "ci_low",
                                                    "ext_ci_high": "ci_high"})),
                hovertext=[
                    f"{h}<br><b>{name}</b>: external {e:.4f}, CV {c:.4f}, gap {d:+.4f}"
                    for h, e, c, d in zip(g["hover"], g["ext"], g["cv"], g["gap"], strict=True)
                ],
                hovertemplate=_HOVER,
            )
        )  # fmt: skip
    _layout(
        fig,
        FIGURE_TITLES["gap"],
        xaxis_title=f"{data.metric}: cross-validation (95 % CI over folds)",
        yaxis_title=f"{data.metric}: external set (95 % bootstrap CI)",
    )
    return fig


def build_figures(data: ReportData) -> dict[str, go.Figure]:
    """Figure key → Plotly figure, in page order (keys of :data:`FIGURE_TITLES`). Figures whose
    data is missing (no ROC recorded, no comparison asked for) are left out."""
    figs: dict[str, go.Figure] = {
        "backbones": _distribution(data, "backbone", FIGURE_TITLES["backbones"], "backbone"),
        "frozen": _frozen(data),
        "heads": _distribution(data, "head", FIGURE_TITLES["heads"], "head"),
    }
    if data.board["lr"].notna().any():
        figs["lr"] = _lr(data)
    figs["parallel"] = _parallel(data)
    figs["importance"] = _importance(data)
    figs["history"] = _history(data)
    figs["pareto"] = _pareto(data)
    if data.confusions:
        figs["confusion"] = _confusion(data)
    if data.rocs:
        figs["roc"] = _roc(data)
    if data.oof is not None and data.oof.reliability:
        figs["reliability"] = _reliability(data)
    figs["curves"] = _curves(data)
    if data.compare is not None and not data.compare.empty:
        figs["compare"] = _compare(data)
    if data.gap is not None and not data.gap.empty:
        figs["gap"] = _gap(data)
    return figs
