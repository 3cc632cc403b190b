"""Options shared by the deploy commands (`evaluate`, `export`, `predict`, `diagnose`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "AnySegmenterOpt",
    "DataDirOpt",
    "JsonOpt",
    "QuietOpt",
    "StudyNameOpt",
    "StudyOpt",
    "TrialOpt",
]

StudyOpt = Annotated[
    str | None, typer.Option("--study", help="SQLite file path or Optuna storage URL.")
]
StudyNameOpt = Annotated[
    str | None, typer.Option("--study-name", help="Study in the storage (default: the only one).")
]
TrialOpt = Annotated[
    str,
    typer.Option(
        "--trial",
        help="'best' (best value; Pareto front: best first metric) or a trial number.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Prepared datasets of the study [$AUTOML_CXR_DATA or ./data]."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress messages.")]
AnySegmenterOpt = Annotated[
    bool,
    typer.Option(
        "--any-segmenter",
        help="Retrain a lung_crop/lung_mask trial with the data folder's lung segmenter even "
        "when the trial was searched with another one that is gone (said in the output and "
        "the card).",
    ),
]
