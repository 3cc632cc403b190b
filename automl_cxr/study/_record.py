"""Plain-data helpers of the study record (no torch: `report` and `dashboard` import these)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["OBJECTIVE_KEYS", "json_safe"]

OBJECTIVE_KEYS = {"latency": "latency_ms", "params": "params_total"}
"""Cost objectives for multi-objective search (minimised), next to any metric (maximised)."""


def json_safe(obj: Any) -> Any:
    """Plain JSON: NaN/inf → None (optuna-dashboard's JSON.parse rejects NaN), numpy → Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return obj
