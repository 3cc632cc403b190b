"""Build the held-out external sets of results/generalisation from the shared sources.

Nothing here is tuned on results: the held-out part is drawn once, by seed, before any study.

* `cohen_sites`: every usable adult image of a seeded quarter of Cohen's acquisition sites
  (whole sites: hospitals the recipes never see), labelled for the binary recipes
  (covid / non_covid) and, where the finding says so, for the four-class ones.
* `nih_holdout`: a seeded quarter of NIH's patients (a hospital that *is* in the adult recipes,
  other patients), all non-COVID; the "No Finding" films are `normal` in the four-class sets.

Each set is written as CSV manifests (path,label,patient_id,source) for `search --external`,
and all of them go to `data prepare --exclude`, so no image (nor patient) of them is in any
recipe. Usage: python results/generalisation/make_external.py SOURCES OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.data import read_cohen, read_nih

FOUR = {"covid", "bacterial", "viral", "normal"}
NON_COVID = {"bacterial", "viral", "normal", "other"}  # Cohen's `uncertain` is never used


def _adult(t: pd.DataFrame) -> pd.Series:
    age = pd.to_numeric(t["age"], errors="coerce")
    return age.isna() | (age >= 18)


def build(sources: Path, out: Path, seed: int = 0, fraction: float = 0.25) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    cohen = read_cohen(sources / "cohen").table
    cohen = cohen[_adult(cohen) & cohen["label"].isin(FOUR | NON_COVID)]
    # Whole sites, never the blank location (it is no one site); until a quarter of Cohen's
    # COVID-19 images and a quarter of its non-COVID images are held out.
    sites = np.array(sorted(set(cohen["site"]) - {"cohen:unknown"}))
    rng.shuffle(sites)
    covid_n = (cohen["label"] == "covid").sum()
    other_n = cohen["label"].isin(NON_COVID).sum()
    held: list[str] = []
    for s in sites:
        part = cohen[cohen["site"].isin(held)]
        if (part["label"] == "covid").sum() >= fraction * covid_n and part["label"].isin(
            NON_COVID
        ).sum() >= fraction * other_n:
            break
        held.append(str(s))
    cs = cohen[cohen["site"].isin(held)]
    # No patient on both sides: a held-out patient's images elsewhere go with them.
    cs = cohen[cohen["patient_id"].isin(set(cs["patient_id"]))]
    nih = read_nih(sources / "nih").table
    nih = nih[_adult(nih)]
    patients = np.array(sorted(nih["patient_id"].unique()))
    rng.shuffle(patients)
    nh = nih[nih["patient_id"].isin(set(patients[: int(round(fraction * len(patients)))]))]

    def write(name: str, t: pd.DataFrame, labels: pd.Series) -> Path:
        f = out / f"{name}.csv"
        pd.DataFrame(
            {
                "path": t["path"],
                "label": labels,
                "patient_id": t["patient_id"].str.split(":", n=1).str[1],
                "source": t["source"],
                "site": t["site"],
            }
        ).to_csv(f, index=False)
        return f

    binary = lambda t: np.where(t["label"] == "covid", "covid", "non_covid")  # noqa: E731
    files = {
        "cohen_sites_binary": write("cohen_sites_binary", cs, binary(cs)),
        "nih_holdout_binary": write("nih_holdout_binary", nh, binary(nh)),
    }
    cs4 = cs[cs["label"].isin(FOUR)]
    nh4 = nh[nh["label"] == "normal"]
    files["cohen_sites_four"] = write("cohen_sites_four", cs4, cs4["label"])
    files["nih_holdout_four"] = write("nih_holdout_four", nh4, nh4["label"])
    both = pd.concat([cs, nh])
    files["adult_holdout_binary"] = write("adult_holdout_binary", both, binary(both))
    both4 = pd.concat([cs4, nh4])
    files["adult_holdout_four"] = write("adult_holdout_four", both4, both4["label"])
    summary = {
        "seed": seed,
        "fraction": fraction,
        "held_out_cohen_sites": held,
        "counts": {
            k: pd.read_csv(f)["label"].value_counts().sort_index().to_dict()
            for k, f in files.items()
        },
    }
    (out / "external_sets.json").write_text(json.dumps(summary, indent=2, default=int))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(build(args.sources, args.out, args.seed), indent=2, default=int))


if __name__ == "__main__":
    main()
