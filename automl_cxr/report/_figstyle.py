"""The report figures' shared look: colours, section titles, layout and axis helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

PALETTE = (
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


STATE_COLOURS = {
    "COMPLETE": "#1f77b4",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#2ca02c",
    "WAITING": "#7f7f7f",
}


HOVER = "%{hovertext}<extra></extra>"


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


def styled(fig: go.Figure, title: str, *, height: int = 420, **kw) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        hoverlabel={"align": "left"},
        **kw,
    )
    return fig


def integer_axis(fig: go.Figure, largest: float) -> None:
    """Whole-number ticks only (trial numbers, steps), about ten of them at most."""
    largest = (
        0
        if largest is None or (isinstance(largest, float) and math.isnan(largest))
        else int(largest)
    )
    fig.update_xaxes(tickmode="linear", tick0=0, dtick=max(1, math.ceil(largest / 10)))


def colour_map(values: Sequence) -> dict:
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(dict.fromkeys(values))}


def ci_error(frame: pd.DataFrame) -> dict:
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


def jitter_offsets(n: int, seed: int = 0, width: float = 0.15) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-width, width, n)
