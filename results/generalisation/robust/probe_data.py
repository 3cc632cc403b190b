"""What the probes beside this file score on: the external sets, prepared against the training
recipe as `search --external` prepares them (refusing copies of training images and films of
training patients)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from automl_cxr.study import prepare_externals

EXTERNAL = Path(__file__).resolve().parent.parent / "external"
"""The external sets' CSVs (drawn by `make_external.py --seed 0`)."""


def external_sets(
    train: Any,
    data_dir: str | Path,
    names: Sequence[str] = ("cohen_sites_binary", "nih_holdout_binary"),
) -> list[Any]:
    """The prepared external sets `names`, in that order, for a study on `train`."""
    paths = [EXTERNAL / f"{n}.csv" for n in names]
    return prepare_externals(paths, dataset=train, data_dir=data_dir)
