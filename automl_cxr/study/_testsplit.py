"""`search --test patient:0.2 | site:0.2`: a test split the search never sees.

It is drawn by the search's seed from the prepared dataset before anything else (before the
profile's subsampling, the folds, the sampler): about the given fraction of each class's
images, whole patients (`patient:`) or whole acquisition sites (`site:`, sites sharing a
patient merged), stratified by label (the engine's holdout splitters). The rest is the search's
data; the folds, the pruner, the sampler and the ranking see only that. Every COMPLETE trial's
fold models predict the test split once; the predictions are stored beside its out-of-fold
predictions and no metric of them is recorded on the trial, so nothing can rank by them. After
the search, `report` and the model card show the best-by-cross-validation trial's (and the
selected ensemble's) figure on it with a patient-bootstrap CI, beside the CV estimate.

Under `site:` every class must keep training images: a site split that would move all of a
class out of the search (NIH holds nearly all adult non-COVID films) is refused by the
splitter, so such a test split holds the other sites, and may hold one class only; its
metrics are then computed on the classes it holds, which the report lists.
"""

from __future__ import annotations

from typing import Any

from automl_cxr.data import PreparedDataset
from automl_cxr.errors import ConfigError

__all__ = ["TEST_KINDS", "describe_held", "parse_test", "search_data", "split_test"]

TEST_KINDS = ("patient", "site")


def describe_held(info: dict) -> str:
    """What a test split holds, from its record: "148 images of 120 patients (covid 60,
    non_covid 88) from 6 whole sites (a, b, c, …)" — the search's console line and the report
    say it in these words."""
    held = ", ".join(f"{c} {n}" for c, n in info["classes"].items())
    sites = info.get("sites") or []
    where = ""
    if sites:
        where = f" from {len(sites)} whole sites ({', '.join(sites[:3])}"
        where += ", …)" if len(sites) > 3 else ")"
    return f"{info['n']} images of {info['patients']} patients ({held}){where}"


def parse_test(text: str) -> tuple[str, float]:
    """``"site:0.2"`` → ``("site", 0.2)``; ConfigError naming the value and what is allowed."""
    kind, sep, value = str(text).strip().partition(":")
    allowed = "patient:F or site:F with 0 < F <= 0.5 (e.g. site:0.2)"
    if not sep or kind not in TEST_KINDS:
        raise ConfigError(f"--test must be {allowed}, but got {text!r}")
    try:
        fraction = float(value)
    except ValueError:
        raise ConfigError(f"--test must be {allowed}, but got {text!r}") from None
    if not 0.0 < fraction <= 0.5:
        raise ConfigError(f"--test fraction must be in (0, 0.5], but got {text!r}")
    return kind, fraction


def split_test(
    dataset: PreparedDataset, spec: str, seed: int
) -> tuple[PreparedDataset, PreparedDataset, dict[str, Any]]:
    """(the search's data, the test split, a record of the split for the study's protocol)."""
    from automl_cxr.engine import (
        dataset_sites,
        make_site_splits,
        make_splits,
        members_hash,
        row_identities,
    )

    kind, fraction = parse_test(spec)
    labels = dataset.manifest["label"].to_numpy()
    if kind == "site":
        sites, _ = dataset_sites(dataset)
        try:
            (split,), _ = make_site_splits(
                labels, dataset.groups, sites, holdout=fraction, seed=seed
            )
        except ConfigError as exc:
            raise ConfigError(f"--test {spec}: {exc}") from None
        held_sites = sorted({str(x) for x in sites[split.val]})
    else:
        (split,) = make_splits(labels, dataset.groups, holdout=fraction, seed=seed)
        held_sites = None
    search = dataset.subset(split.train, tag=f"search-test-{spec}-seed{seed}")
    test = dataset.subset(split.val, tag=f"test-{spec}-seed{seed}")
    counts = test.manifest["label"].value_counts()
    info = {
        "spec": spec,
        "kind": kind,
        "fraction": fraction,
        "seed": int(seed),
        "n": len(test),
        "n_search": len(search),
        "patients": int(len(set(test.groups))),
        "classes": {c: int(counts.get(c, 0)) for c in dataset.classes},
        "sites": held_sites,
        "hash": test.hash,
        "members_hash": members_hash(row_identities(dataset), split.val),
    }
    return search, test, info


def search_data(
    full: PreparedDataset, max_per_class: int | None, seed: int, test: str | None
) -> tuple[PreparedDataset, PreparedDataset | None, dict[str, Any] | None]:
    """The rows a search trains and validates on (the test split taken out first, then the
    profile's subsampling), the test split, and its record (None without `test`)."""
    from automl_cxr.study._objective import subsample

    if test is None:
        return subsample(full, max_per_class, seed), None, None
    search, held, info = split_test(full, test, seed)
    return subsample(search, max_per_class, seed), held, info
