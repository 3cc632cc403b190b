"""Quickstart: the whole chain from Python, on the shared chest X-rays, in about a minute.

    python examples/quickstart.py [--sources ../shared/data] [--work DIR] [--profile smoke]

Prepares the adult COVID-19 vs other recipe (`binary_adult`), runs a small site-held-out
search with a test split the search never sees, prints the leaderboard and the test-split
figures, exports the best trial and classifies two films with it. The `smoke` profile uses
tiny models: the numbers show the mechanics, not a useful model (use `--profile cpu`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

import automl_cxr as ac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default=None, help="folder with cohen/, kermany/, nih/")
    parser.add_argument("--work", default="quickstart-out", help="where everything is written")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "data"

    datasets = ac.prepare(args.sources, data_dir=data, recipes=["binary_adult"])
    print(datasets.to_string(index=False))

    study = ac.search(
        "binary_adult",
        trials=args.trials,
        data_dir=data,
        storage=work / "quickstart.db",
        profile=args.profile,
        cv="site",  # every fold holds out whole hospitals
        test="site:0.2",  # and a fifth of the images, whole sites, is never seen by the search
    )

    rep = ac.report(study)
    print(rep.leaderboard[["rank", "number", "value", "ci_low", "ci_high"]].to_string(index=False))
    print("\n".join(rep.test_split))
    files = rep.save(work / "report")
    print(f"report: {files[0].parent / 'index.html'}")

    model = ac.export(study, out=work / "model", data_dir=data, operating_point="youden")
    films = pd.read_csv(data / "binary_adult" / "manifest.csv")["path"].head(2).tolist()
    print(model.predict(films).to_string(index=False))


if __name__ == "__main__":
    main()
