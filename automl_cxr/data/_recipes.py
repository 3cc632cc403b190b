"""Dataset recipes (the paper's, and de-confounded ones): which labels from which sources, how
many images, sampled by patient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from automl_cxr.errors import ConfigError

__all__ = [
    "PAPER_RECIPES",
    "Recipe",
    "get_recipe",
    "list_recipes",
    "pool_mask",
    "register_recipe",
]


def pool_mask(pool: pd.DataFrame, key: str) -> pd.Series:
    """Rows of `pool` a pool key draws from: `source:label` (e.g. `kermany:bacterial`), or a
    bare `label` for every source."""
    source, _, label = key.rpartition(":")
    mask = pool["label"] == label
    return mask & (pool["source"] == source) if source else mask


def _key_label(key: str) -> str:
    return key.rpartition(":")[2]


@dataclass(frozen=True)
class Recipe:
    """A dataset recipe.

    `classes` maps each output label to the pool keys it is drawn from and how many images
    of each (the paper's target counts). A pool key is `source:label` (the paper's recipes take
    `bacterial` from Kermany only, although Cohen holds bacterial pneumonia too) or a bare label
    (any source). Where the pool has fewer, everything is taken and the shortfall is reported.
    `min_age` leaves out images whose known age is below it (unknown ages are kept and
    counted); `requires` names the sources the recipe cannot be built without; `fill` names,
    for a label drawn from several sources, the pool key that tops it up when `--count LABEL=N`
    sets the label's total.
    """

    name: str
    description: str
    classes: Mapping[str, Mapping[str, int]]
    reference: str = ""
    positive: str | None = "covid"
    notes: tuple[str, ...] = field(default_factory=tuple)
    min_age: float | None = None
    requires: tuple[str, ...] = ()
    fill: Mapping[str, str] = field(default_factory=dict)

    @property
    def pool_keys(self) -> list[str]:
        return [k for parts in self.classes.values() for k in parts]

    def count_key(self, key: str) -> str | None:
        """The pool key a `--count` key sets in this recipe: the key itself, a bare label
        naming one pool key (`viral` → `kermany:viral`), or the label's `fill` key; None if
        it names none."""
        known = self.pool_keys
        if key in known:
            return key
        if ":" in key:
            return None
        matches = [k for k in known if _key_label(k) == key]
        if len(matches) > 1:
            if key in self.fill:
                return self.fill[key]
            raise ConfigError(
                f"count {key!r} is ambiguous in recipe {self.name!r}, which draws {key!r} from "
                f"{matches}: name one, e.g. --count {matches[0]}=N (or choose the recipe "
                "with --recipe)"
            )
        return matches[0] if matches else None

    def with_counts(self, counts: Mapping[str, int]) -> Recipe:
        """Override target counts by pool key or label (e.g. {"viral": 400}); unknown keys are
        errors. A label drawn from several sources sets the label's total: its `fill` key
        takes what the other sources' targets leave."""
        resolved: dict[str, int] = {}
        totals: dict[str, tuple[str, int]] = {}
        for k, v in counts.items():
            key = self.count_key(k)
            if key is None:
                raise ConfigError(
                    f"recipe {self.name!r} has no pool label(s) {[k]}; allowed: "
                    f"{sorted(set(self.pool_keys) | {_key_label(p) for p in self.pool_keys})}"
                )
            if int(v) < 1:
                raise ConfigError(f"count for {k!r} must be at least 1, but got {k}={v}")
            if k not in self.pool_keys and self.fill.get(k) == key:
                totals[k] = (key, int(v))
            else:
                resolved[key] = int(v)
        current = {p: n for parts in self.classes.values() for p, n in parts.items()}
        current.update(resolved)
        for label, (key, total) in totals.items():
            others = {p: n for p, n in current.items() if _key_label(p) == label and p != key}
            rest = total - sum(others.values())
            if rest < 1:
                raise ConfigError(
                    f"count {label}={total} must be more than the {sum(others.values())} "
                    f"{label} images recipe {self.name!r} draws from {sorted(others)}, which "
                    f"{key} tops up; set {key} directly instead"
                )
            resolved[key] = rest
        classes = {
            label: {p: int(resolved.get(p, n)) for p, n in parts.items()}
            for label, parts in self.classes.items()
        }
        return replace(self, classes=classes)

    @property
    def targets(self) -> dict[str, int]:
        return {label: sum(parts.values()) for label, parts in self.classes.items()}

    def select(self, pool: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, dict]:
        """Sample rows of `pool` (columns label, source, group_id, age, ...) by patient,
        deterministically.

        Patients are shuffled with `seed` and taken whole until the target is reached (the
        last one is cut at the target). Returns the selection with `label` rewritten to the
        recipe's labels (and `pool_key` saying where each row was drawn from), and the
        shortfalls `{pool_key: {"target": n, "available": m}}`.
        The age filter's counts are in `self.age_filter(pool)`.
        """
        rng = np.random.default_rng(seed)
        eligible = self._eligible(pool)
        parts_out = []
        shortfalls: dict[str, dict[str, int]] = {}
        for label, parts in self.classes.items():
            for pool_key, target in parts.items():
                rows = eligible[pool_mask(eligible, pool_key)]
                if len(rows) < target:
                    shortfalls[pool_key] = {"target": int(target), "available": len(rows)}
                # group_id keeps near-duplicate patients together, patient order is seeded.
                patients = np.array(sorted(rows["group_id"].unique()))
                rng.shuffle(patients)
                order = {p: i for i, p in enumerate(patients)}
                ranked = rows.assign(_rank=rows["group_id"].map(order)).sort_values(
                    ["_rank", "path"], kind="stable"
                )
                taken = (
                    ranked.head(target).drop(columns="_rank").assign(label=label, pool_key=pool_key)
                )
                parts_out.append(taken)
        out = pd.concat(parts_out, ignore_index=True) if parts_out else pool.head(0)
        return out, shortfalls

    def _eligible(self, pool: pd.DataFrame) -> pd.DataFrame:
        if self.min_age is None:
            return pool
        age = pd.to_numeric(pool["age"], errors="coerce")
        return pool[~(age < self.min_age)]

    def age_filter(self, pool: pd.DataFrame) -> dict | None:
        """What `min_age` did, per pool key: images left out as too young, and images kept
        although their age is unknown."""
        if self.min_age is None:
            return None
        age = pd.to_numeric(pool["age"], errors="coerce")
        out: dict = {"min_age": self.min_age, "unknown_age": "kept", "per_pool_key": {}}
        for key in self.pool_keys:
            m = pool_mask(pool, key)
            out["per_pool_key"][key] = {
                "left_out_younger": int((m & (age < self.min_age)).sum()),
                "kept_age_unknown": int((m & age.isna()).sum()),
            }
        return out


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

_PAPER_NOTE = (
    "Every COVID-19 image comes from Cohen's collection (adults, many hospitals) and every other "
    "image from Kermany's (children aged 1-5, one hospital in Guangzhou): the label is the "
    "source (Cramér's V 1.0), so a model can score well by recognising the collection."
)
PAPER_RECIPES = ("three_class", "four_class", "binary")

register_recipe(
    Recipe(
        "three_class",
        "Paper dataset 1: COVID-19 (Cohen) 224, bacterial pneumonia 700, normal 504 (Kermany)",
        {
            "covid": {"cohen:covid": 224},
            "bacterial": {"kermany:bacterial": 700},
            "normal": {"kermany:normal": 504},
        },
        reference=_PAPER,
        notes=(_PAPER_NOTE,),
    )
)
register_recipe(
    Recipe(
        "four_class",
        "Paper dataset 2 with its pneumonia class split: COVID-19 224, bacterial 357, viral 357,"
        " normal 504",
        {
            "covid": {"cohen:covid": 224},
            "bacterial": {"kermany:bacterial": 357},
            "viral": {"kermany:viral": 357},
            "normal": {"kermany:normal": 504},
        },
        reference=_PAPER,
        notes=(_PAPER_NOTE,),
    )
)
register_recipe(
    Recipe(
        "binary",
        "The paper's 2-class evaluation: COVID-19 224 vs non-COVID (bacterial 357, viral 357,"
        " normal 504)",
        {
            "covid": {"cohen:covid": 224},
            "non_covid": {"kermany:bacterial": 357, "kermany:viral": 357, "kermany:normal": 504},
        },
        reference=_PAPER,
        notes=(_PAPER_NOTE,),
    )
)
register_recipe(
    Recipe(
        "binary_adult",
        "COVID-19 vs non-COVID in adults (age >= 18 where known): COVID-19 412 (Cohen) vs "
        "non-COVID 688 (NIH ChestX-ray14 602: No Finding 98 and 504 with other findings; "
        "Cohen's own non-COVID 86: bacterial 32, viral 21, no finding 13, other 20)",
        {
            "covid": {"cohen:covid": 412},
            "non_covid": {
                "nih:normal": 98,
                "nih:other": 504,
                "cohen:bacterial": 32,
                "cohen:viral": 21,
                "cohen:normal": 13,
                "cohen:other": 20,
            },
        },
        notes=(
            "Counts are after the duplicate finder merged re-framed copies (issue 28): Cohen "
            "holds 9 COVID-19 and 1 bacterial film twice.",
            "No children: the child-vs-adult shortcut of the paper's recipes is gone, and "
            "non-COVID comes from two collections (NIH, one US hospital; Cohen, many).",
            "Confounding that remains: every COVID-19 image still comes from Cohen's "
            "collection, and NIH (87 % of non-COVID) holds no COVID-19; every NIH image "
            "predates COVID-19 (2017). Cramér's V source-label is about 0.85 (binary: 1.0).",
            "Unknown ages are kept (Cohen: 129 images; of its images with a known age, 416 of "
            "417 are adults) and counted per pool key in dataset.json `age_filter`.",
            "Cohen findings that do not say whether they are COVID-19 (todo, Unknown, "
            "Pneumonia unspecified) are never used; Pneumocystis, Lipoid and ARDS (filed "
            "apart from 'COVID-19, ARDS') are non-COVID `other`.",
        ),
        min_age=18.0,
        requires=("cohen", "nih"),
    )
)
register_recipe(
    Recipe(
        "four_class_mixed",
        "The paper's four classes at four_class's sizes, each drawn from every source that "
        "holds it: COVID-19 224 (Cohen); bacterial 357 (Cohen 32 + Kermany 325); viral 357 "
        "(Cohen 21 + Kermany 336); normal 504 (NIH No Finding 100 + Cohen 13 + Kermany 391)",
        {
            "covid": {"cohen:covid": 224},
            "bacterial": {"cohen:bacterial": 32, "kermany:bacterial": 325},
            "viral": {"cohen:viral": 21, "kermany:viral": 336},
            "normal": {"nih:normal": 100, "cohen:normal": 13, "kermany:normal": 391},
        },
        reference=_PAPER,
        notes=(
            "Every adult non-COVID image of the shared data that fits a class is used "
            "(Cohen's bacterial, viral, no finding; NIH's No Finding), Kermany fills the rest "
            "of four_class's class sizes; Cramér's V source-label about 0.65 (four_class 1.0).",
            "Confounding that remains: every COVID-19 image still comes from Cohen and "
            "is an adult; bacterial, viral and normal are still mostly children from one "
            "hospital (Kermany 91 %, 94 %, 78 %); NIH holds only normals.",
        ),
        requires=("cohen", "kermany", "nih"),
        fill={
            "bacterial": "kermany:bacterial",
            "viral": "kermany:viral",
            "normal": "kermany:normal",
        },
    )
)
