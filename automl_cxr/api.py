"""The Python API: what the command line does, as functions a notebook calls.

```python
import automl_cxr as ac

ac.prepare(sources="../shared/data")                       # a table of prepared datasets
study = ac.search("binary_adult", trials=30, cv="site")     # an optuna.Study, resumable
rep = ac.report(study)     # rep.leaderboard (pandas), rep.figures (Plotly), rep.save(dir)
model = ac.export(study, trial="best", out="models/best")
model.predict(["a.png", "b.dcm"])                           # a DataFrame of probabilities
```

Thin over the same code as the CLI (which keeps its own printing): the arguments follow the
CLI's option names, errors are the same :class:`~automl_cxr.AutomlCxrError` subclasses with
the same messages, and long calls show progress (rich renders it in Jupyter as on a terminal;
``progress=False`` silences it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from automl_cxr._progress import progress_bar

__all__ = ["Model", "Report", "export", "load_model", "prepare", "report", "search"]


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _say(enabled: bool):
    if not enabled:
        return None
    console = _console()
    return lambda line: console.print(line, markup=False)


def _storage_of(study: Any) -> str:
    """The storage path/URL of an Optuna study object, or the path/URL given."""
    if isinstance(study, str | Path):
        return str(study)
    from automl_cxr._compat.optuna import storage_of
    from automl_cxr.study import storage_location

    url = storage_location(storage_of(study))
    if url is None:
        from automl_cxr.errors import StorageError

        raise StorageError(
            f"study {study.study_name!r} lives in memory: pass one stored in a file or a "
            "database (search(..., storage='studies/x.db'))"
        )
    return url


def _name_of(study: Any, study_name: str | None) -> str | None:
    if study_name is not None or isinstance(study, str | Path):
        return study_name
    return study.study_name


def prepare(
    sources: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    recipes: Sequence[str] | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    exclude: Sequence[str | Path] = (),
    near_duplicates: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Build the dataset recipes from the public sources (``automl-cxr data prepare
    --sources``): one row per dataset with its name, image count, per-class counts and folder.
    `sources` holds ``cohen/``, ``kermany/`` and optionally ``nih/`` (default: as the CLI);
    `near_duplicates=False` removes byte-identical copies only (``--no-near-duplicates``)."""
    from automl_cxr.data import load_dataset, prepare_recipes
    from automl_cxr.settings import resolve_data_dir, source_folders

    found = source_folders(sources)
    out = resolve_data_dir(data_dir)
    with progress_bar("decoding images", enabled=progress, console=_console()) as update:
        paths = prepare_recipes(
            cohen=found["cohen"],
            kermany=found["kermany"],
            nih=found["nih"],
            data_dir=out,
            recipes=list(recipes) if recipes else None,
            seed=seed,
            skip_bad=skip_bad,
            progress=update,
            exclude=exclude,
            near_duplicates=near_duplicates,
        )
    rows = []
    for p in paths:
        ds = load_dataset(p.name, out)
        rows.append(
            {"dataset": ds.name, "images": len(ds), **ds.meta.get("classes", {}), "path": str(p)}
        )
    return pd.DataFrame(rows).fillna(0)


def search(
    dataset: str,
    trials: int = 20,
    *,
    data_dir: str | Path | None = None,
    storage: str | Path | None = None,
    study_name: str | None = None,
    profile: str | None = None,
    cv: str = "patient",
    test: str | None = None,
    progress: bool = True,
    **options: Any,
):
    """Run (or resume) a search until the study holds `trials` finished trials, as
    ``automl-cxr search`` does; returns the :class:`optuna.Study`. `options` are the other
    :class:`~automl_cxr.study.SearchSettings` fields (``metric``, ``space``, ``sampler``,
    ``pruner``, ``workers``, ``backend``, ``seed``, ``externals``, ``trial_timeout``, ...)."""
    from automl_cxr.settings import resolve_data_dir
    from automl_cxr.study import SearchSettings, load_study, run_search

    settings = SearchSettings(
        dataset=dataset,
        trials=trials,
        data_dir=resolve_data_dir(data_dir),
        storage=str(storage) if storage is not None else None,
        study_name=study_name,
        profile=profile,
        cv=cv,
        test=test,
        **options,
    )
    import optuna

    say = _say(progress)
    # One line per trial from here; Optuna's own INFO lines repeat every parameter.
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def on_trial(study, trial) -> None:
        if say is not None:
            value = "" if trial.value is None else f" {trial.value:.4f}"
            say(f"trial {trial.number} {trial.state.name}{value}")

    summary = run_search(settings, on_trial=on_trial, log=say)
    return load_study(summary.storage, summary.study_name)


@dataclass
class Report:
    """A study's report: `leaderboard` (one row per ranked trial), `figures` (Plotly figures
    by name), `data` (everything computed), `save(folder)` (the report folder the CLI
    writes); shows its leaderboard and test-split figures in Jupyter."""

    data: Any

    @property
    def leaderboard(self) -> pd.DataFrame:
        return pd.DataFrame(self.data.leaderboard_records())

    @property
    def figures(self) -> dict[str, Any]:
        from automl_cxr.report import build_figures

        return build_figures(self.data)

    @property
    def test_split(self) -> list[str]:
        """Sentences on the search's test split (`search(test=...)`): what it holds, the
        best-by-CV trial's figure on it beside its CV estimate; empty without one."""
        from automl_cxr.report._tables import describe_test_split

        return describe_test_split(self.data)

    def save(self, folder: str | Path | None = None) -> list[Path]:
        """Write index.html, report.md, CSV/JSON exports; returns the files written."""
        from automl_cxr.report import default_out_dir, render_html, report_files, write_files

        files = report_files(self.data, render_html(self.data, self.figures))
        target = Path(folder) if folder is not None else default_out_dir(self.data.study_name)
        return write_files(target, files)

    def _repr_html_(self) -> str:
        import html

        head = f"<h3>{html.escape(self.data.study_name)}: ranked by {self.data.metric}</h3>"
        notes = "".join(f"<p>{html.escape(t)}</p>" for t in self.test_split)
        return head + self.leaderboard.head(10).to_html(index=False) + notes


def report(
    study: Any,
    *,
    study_name: str | None = None,
    metric: str | None = None,
    top: int = 10,
    operating_point: str | None = "youden",
) -> Report:
    """The report of a study (an :class:`optuna.Study` or its storage path/URL), as
    ``automl-cxr report`` computes it, without writing anything until :meth:`Report.save`."""
    from automl_cxr.report import load_report

    data = load_report(
        _storage_of(study),
        study_name=_name_of(study, study_name),
        metric=metric,
        top=top,
        operating_point=operating_point,
    )
    return Report(data)


class Model:
    """An exported model folder: `predict(paths)` gives a DataFrame of class probabilities,
    the arg-max and (with an operating point) the thresholded class per image."""

    def __init__(self, folder: str | Path, runtime: str = "torchscript") -> None:
        from automl_cxr.deploy import ExportedModel

        self.folder = Path(folder)
        self._model = ExportedModel(folder, runtime=runtime)

    @property
    def classes(self) -> list[str]:
        return list(self._model.classes)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._model.config)

    def predict(self, paths: Sequence[str | Path]) -> pd.DataFrame:
        """One row per image: ``path``, one probability column per class, ``predicted``,
        ``thresholded`` (None without an operating point)."""
        from automl_cxr.deploy import predict_images

        rows = []
        for r in predict_images(self._model, [Path(p) for p in paths]):
            rows.append(
                {
                    "path": str(r["path"]),
                    **{c: float(v) for c, v in r["probabilities"].items()},
                    "predicted": r["predicted"],
                    "thresholded": r.get("thresholded"),
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"Model({str(self.folder)!r}, classes={self.classes})"


def load_model(folder: str | Path, runtime: str = "torchscript") -> Model:
    """An exported model folder (``automl-cxr export --out``)."""
    return Model(folder, runtime)


def export(
    study: Any,
    *,
    trial: str | int = "best",
    out: str | Path = "models/best",
    study_name: str | None = None,
    data_dir: str | Path | None = None,
    ensemble: bool = False,
    calibrate: bool = True,
    operating_point: str | None = None,
    ensemble_select: int | None = None,
    progress: bool = True,
    **options: Mapping[str, Any] | Any,
) -> Model:
    """Retrain and export a trial as ``automl-cxr export`` does (TorchScript, ONNX, model
    card; calibrated on a holdout of patients it does not train on); returns the model."""
    from automl_cxr.deploy import run_export

    run_export(
        _storage_of(study),
        out,
        study_name=_name_of(study, study_name),
        trial=trial,
        data_dir=data_dir,
        ensemble=ensemble,
        calibrate=calibrate,
        operating_point=operating_point,
        ensemble_select=ensemble_select,
        log=_say(progress),
        **options,
    )
    return Model(out)
