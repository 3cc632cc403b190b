"""The top trials' figures: confusion matrices, ROC and reliability curves, learning curves,
the study comparison and the generalisation gap to external sets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from automl_cxr.report._data import ReportData
from automl_cxr.report._figstyle import (
    FIGURE_TITLES,
    HOVER,
    PALETTE,
    ci_error,
    colour_map,
    integer_axis,
    styled,
)


def confusion_figure(data: ReportData) -> go.Figure:
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
    return styled(fig, FIGURE_TITLES["confusion"] + " (summed over folds)", height=400)


def roc_figure(data: ReportData) -> go.Figure:
    items = data.rocs
    points = {op["number"]: op for op in (data.oof.operating if data.oof else [])}
    n = max(1, len(items))
    titles = [f"#{c['rank']} trial {c['number']} ({c['backbone']})" for c in items] or [""]
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles, horizontal_spacing=0.05)
    labels = list(dict.fromkeys(lbl for c in items for lbl in c["curves"]))
    colours = colour_map(labels)
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
    return styled(fig, FIGURE_TITLES["roc"] + " (one vs rest, pooled out-of-fold)", height=400)


def reliability_figure(data: ReportData) -> go.Figure:
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
                line={"color": PALETTE[i % len(PALETTE)]},
                error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                customdata=r["count"],
                hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} images"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="confidence (top-class probability)", range=[0, 1])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    return styled(fig, FIGURE_TITLES["reliability"] + " (pooled out-of-fold, top label)")


def curves_figure(data: ReportData) -> go.Figure:
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
                    "color": PALETTE[i % len(PALETTE)],
                    "width": 2.5 if highlight else 1.2,
                    "dash": "solid" if state == "COMPLETE" else "dot",
                },
                marker={"size": 5, "symbol": "circle" if state == "COMPLETE" else "x"},
                opacity=1.0 if highlight or state != "COMPLETE" else 0.6,
                showlegend=bool(highlight) or len(lc["number"].unique()) <= 20,
                hovertext=texts,
                hovertemplate=HOVER,
            )
        )
    integer_axis(fig, lc["step"].max() if len(lc) else 0)
    if lc.empty:
        fig.add_annotation(
            text="no intermediate values recorded",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
    styled(
        fig,
        FIGURE_TITLES["curves"] + "<br><sup>step = fold × epochs + epoch, a gap between "
        "folds; solid = complete (thick: top trials), dotted = pruned / running</sup>",
        xaxis_title="step",
        yaxis_title=f"validation {data.metric}",
        height=460,
    )
    return fig


def compare_figure(data: ReportData) -> go.Figure:
    c = data.compare
    fig = go.Figure()
    names = (data.study_name, data.compare_name or "other")
    for tag, name, colour in (("a", names[0], PALETTE[0]), ("b", names[1], PALETTE[1])):
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
                hovertemplate=HOVER,
            )
        )
    styled(
        fig,
        FIGURE_TITLES["compare"],
        barmode="group",
        yaxis_title=data.metric,
        xaxis_title="backbone",
    )
    return fig


def gap_figure(data: ReportData) -> go.Figure:
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
                marker={"color": PALETTE[i % len(PALETTE)], "size": 9},
                error_x=ci_error(g.rename(columns={"cv": "value", "cv_ci_low": "ci_low",
                                                    "cv_ci_high": "ci_high"})),
                error_y=ci_error(g.rename(columns={"ext": "value", "ext_ci_low": "ci_low",
                                                    "ext_ci_high": "ci_high"})),
                hovertext=[
                    f"{h}<br><b>{name}</b>: external {e:.4f}, CV {c:.4f}, gap {d:+.4f}"
                    for h, e, c, d in zip(g["hover"], g["ext"], g["cv"], g["gap"], strict=True)
                ],
                hovertemplate=HOVER,
            )
        )  # fmt: skip
    styled(
        fig,
        FIGURE_TITLES["gap"],
        xaxis_title=f"{data.metric}: cross-validation (95 % CI over folds)",
        yaxis_title=f"{data.metric}: external set (95 % bootstrap CI)",
    )
    return fig
