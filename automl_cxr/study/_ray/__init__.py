"""`--backend ray`: the study's trials as Ray Tune trials, on any GPUs and machines of a
cluster, with the same objective and storage as the local backend.

  _worker      one trial on a Ray worker (the objective, its reports, its failure reasons)
  _schedulers  Tune's FIFO/ASHA schedulers, recording errors and early stops
  _driver      the ask/tell searcher: Optuna samples, Tune places, results return to the study
  _tune        `run_ray`: the Tune run (starts or joins a cluster, stops what it started)

Imports ray: loaded only when `run_search` is asked for the Ray backend.
"""

from __future__ import annotations

from automl_cxr.study._ray._tune import run_ray

__all__ = ["run_ray"]
