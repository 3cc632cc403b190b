"""Shortcut diagnostics: is the label predictable from where an image came from?

The paper's recipes take every COVID-19 image from one collection (adults, many hospitals) and
every other class from another (children aged 1-5, one hospital). A model can then score well by
recognising the source, not the disease (DeGrave et al. 2021, Nat Mach Intell 3:610-619).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats.contingency import association

__all__ = ["ALIGNMENT_WARN_AT", "age_by_class", "site_label_table", "source_label_alignment"]

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


def _r(x: float) -> float | None:
    return None if pd.isna(x) else round(float(x), 1)


def age_by_class(manifest: pd.DataFrame, classes: list[str] | None = None) -> dict:
    """Per class: how many ages are known, their median, quartiles and range, and how many
    images are of children and adults (`age_group`: Kermany's children count as children
    although their ages are not published). `share_children` is over images whose group is
    known."""
    age = pd.to_numeric(manifest.get("age", pd.Series(np.nan, index=manifest.index)), "coerce")
    group = manifest.get("age_group", pd.Series("", index=manifest.index)).fillna("")
    sex = manifest.get("sex", pd.Series("", index=manifest.index)).fillna("")
    out: dict[str, dict] = {}
    for label in classes or sorted(manifest["label"].unique()):
        m = manifest["label"] == label
        a = age[m].dropna()
        children = int((group[m] == "child").sum())
        adults = int((group[m] == "adult").sum())
        out[label] = {
            "images": int(m.sum()),
            "age_known": len(a),
            "median": _r(a.median()) if len(a) else None,
            "q1": _r(a.quantile(0.25)) if len(a) else None,
            "q3": _r(a.quantile(0.75)) if len(a) else None,
            "min": _r(a.min()) if len(a) else None,
            "max": _r(a.max()) if len(a) else None,
            "children": children,
            "adults": adults,
            "age_group_unknown": int(m.sum()) - children - adults,
            "share_children": round(children / (children + adults), 3)
            if children + adults
            else None,
            "sex": {"M": int((sex[m] == "M").sum()), "F": int((sex[m] == "F").sum())},
        }
    return out


def site_label_table(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per acquisition site and class (`site` column; the source where it is absent)."""
    site = manifest["site"] if "site" in manifest else manifest["source"]
    table = pd.crosstab(site, manifest["label"])
    return {str(s): {k: int(v) for k, v in row.items() if v} for s, row in table.iterrows()}
