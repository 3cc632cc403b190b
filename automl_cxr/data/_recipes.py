"""The paper's datasets as named recipes: which labels, how many images, sampled by patient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from automl_cxr.errors import ConfigError

__all__ = ["Recipe", "get_recipe", "list_recipes", "register_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A dataset recipe.

    `classes` maps each output label to the pool labels it is drawn from and how many images
    of each (the paper's target counts). Where the pool has fewer, everything is taken and the
    shortfall is reported.
    """

    name: str
    description: str
    classes: Mapping[str, Mapping[str, int]]
    reference: str = ""
    positive: str | None = "covid"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def with_counts(self, counts: Mapping[str, int]) -> Recipe:
        """Override target counts by pool label (e.g. {"viral": 400}); unknown labels are errors."""
        known = {p for parts in self.classes.values() for p in parts}
        unknown = sorted(set(counts) - known)
        if unknown:
            raise ConfigError(
                f"recipe {self.name!r} has no pool label(s) {unknown}; allowed: {sorted(known)}"
            )
        for k, v in counts.items():
            if int(v) < 1:
                raise ConfigError(f"count for {k!r} must be at least 1, but got {k}={v}")
        classes = {
            label: {p: int(counts.get(p, n)) for p, n in parts.items()}
            for label, parts in self.classes.items()
        }
        return Recipe(self.name, self.description, classes, self.reference, self.positive)

    @property
    def targets(self) -> dict[str, int]:
        return {label: sum(parts.values()) for label, parts in self.classes.items()}

    def select(self, pool: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, dict]:
        """Sample rows of `pool` (columns label, group_id, ...) by patient, deterministically.

        Patients are shuffled with `seed` and taken whole until the target is reached (the
        last one is cut at the target). Returns the selection with `label` rewritten to the
        recipe's labels, and the shortfalls `{pool_label: {"target": n, "available": m}}`.
        """
        rng = np.random.default_rng(seed)
        parts_out = []
        shortfalls: dict[str, dict[str, int]] = {}
        for label, parts in self.classes.items():
            for pool_label, target in parts.items():
                rows = pool[pool["label"] == pool_label]
                if len(rows) < target:
                    shortfalls[pool_label] = {"target": int(target), "available": len(rows)}
                # group_id keeps near-duplicate patients together, patient order is seeded.
                patients = np.array(sorted(rows["group_id"].unique()))
                rng.shuffle(patients)
                order = {p: i for i, p in enumerate(patients)}
                ranked = rows.assign(_rank=rows["group_id"].map(order)).sort_values(
                    ["_rank", "path"], kind="stable"
                )
                taken = ranked.head(target).drop(columns="_rank").assign(label=label)
                parts_out.append(taken)
        out = pd.concat(parts_out, ignore_index=True) if parts_out else pool.head(0)
        return out, shortfalls


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown dataset recipe {name!r}; allowed: {sorted(_RECIPES)}") from None


def list_recipes() -> list[Recipe]:
    return list(_RECIPES.values())


_PAPER = (
    "Apostolopoulos & Mpesiana 2020, Phys Eng Sci Med 43:635-640, doi:10.1007/s13246-020-00865-4"
)

register_recipe(
    Recipe(
        "three_class",
        "Paper dataset 1: COVID-19 (Cohen) 224, bacterial pneumonia 700, normal 504 (Kermany)",
        {"covid": {"covid": 224}, "bacterial": {"bacterial": 700}, "normal": {"normal": 504}},
        reference=_PAPER,
    )
)
register_recipe(
    Recipe(
        "four_class",
        "Paper dataset 2 with its pneumonia class split: COVID-19 224, bacterial 357, viral 357,"
        " normal 504",
        {
            "covid": {"covid": 224},
            "bacterial": {"bacterial": 357},
            "viral": {"viral": 357},
            "normal": {"normal": 504},
        },
        reference=_PAPER,
    )
)
register_recipe(
    Recipe(
        "binary",
        "The paper's 2-class evaluation: COVID-19 224 vs non-COVID (bacterial 357, viral 357,"
        " normal 504)",
        {
            "covid": {"covid": 224},
            "non_covid": {"bacterial": 357, "viral": 357, "normal": 504},
        },
        reference=_PAPER,
    )
)
