"""Speed of the vectorised bootstrap (moved here from the unit tests: no test times itself).

    python benchmarks/bootstrap_speed.py

2,000 images, 4 classes, 1,000 resamples over images and over patients (3 images each).
Target: well under a second each on one core.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from automl_cxr.engine import bootstrap_metrics


def main() -> int:
    torch.set_num_threads(1)
    rng = np.random.default_rng(9)
    y = rng.integers(0, 4, 2000)
    p = rng.dirichlet(np.ones(4), 2000)
    groups = (np.arange(2000) // 3).astype(str)
    classes = ["covid", "normal", "bacterial", "viral"]
    for unit, g in (("image", None), ("patient", groups)):
        t0 = time.perf_counter()
        bootstrap_metrics(y, p, classes, n_boot=1000, groups=g)
        print(f"bootstrap over {unit}s: {time.perf_counter() - t0:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
