"""Shortcut diagnostics: is the label predictable from where an image came from?

The paper's recipes take every COVID-19 image from one collection (adults, many hospitals) and
every other class from another (children aged 1-5, one hospital). A model can then score well by
recognising the source, not the disease (DeGrave et al. 2021, Nat Mach Intell 3:610-619).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats.contingency import association

__all__ = ["ALIGNMENT_WARN_AT", "source_label_alignment"]

ALIGNMENT_WARN_AT = 0.5
"""Cramér's V between source and label at or above which a warning is raised."""


def source_label_alignment(manifest: pd.DataFrame) -> dict:
    """How strongly `source` and `label` are aligned in a manifest.

    Returns `cramers_v` (0 = independent, 1 = the source determines the label), the
    contingency table, the classes that come from a single source holding no other class
    (`confounded_classes`), and a plain-language `warning` (None when aligned weakly).
    """
    table = pd.crosstab(manifest["source"], manifest["label"])
    if table.shape[0] < 2 or table.shape[1] < 2:
        v = 0.0
    else:
        v = float(association(table.to_numpy(), method="cramer"))
    confounded = []
    for label in table.columns:
        col = table[label]
        sources = col[col > 0].index.tolist()
        if len(sources) == 1:
            others = table.loc[sources[0]].drop(label)
            if (others == 0).all():
                confounded.append({"label": label, "source": sources[0]})
    warning = None
    if v >= ALIGNMENT_WARN_AT or confounded:
        parts = [f"source and label are aligned (Cramér's V = {v:.2f})"]
        if confounded:
            parts.append(
                "; ".join(
                    f"every {c['label']!r} image comes from {c['source']!r}, "
                    "which holds no other class"
                    for c in confounded
                )
            )
        parts.append(
            "a model can score well by recognising the source (hospital, patient age, "
            "scanner) instead of the disease: treat high scores as a possible shortcut and "
            "validate externally (DeGrave et al. 2021)"
        )
        warning = "; ".join(parts)
    return {
        "cramers_v": round(v, 4),
        "contingency": {s: {k: int(x) for k, x in row.items()} for s, row in table.iterrows()},
        "confounded_classes": confounded,
        "warning": warning,
        "sources": int(table.shape[0]),
        "max_class_share_single_source": float(
            np.max(table.max(axis=0) / table.sum(axis=0)) if table.size else 0.0
        ),
    }
