"""Where things live by default: data directory, public sources, studies, dashboards."""

from __future__ import annotations

import os
from pathlib import Path

from automl_cxr.errors import DataError

__all__ = [
    "default_data_dir",
    "default_sources_dir",
    "project_root",
    "resolve_data_dir",
]


def project_root() -> Path:
    """The checkout this package lives in (where `studies/` and `dashboards/` are)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """`$AUTOML_CXR_DATA`, else `./data`."""
    env = os.environ.get("AUTOML_CXR_DATA")
    return Path(env) if env else Path.cwd() / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


def default_sources_dir() -> Path:
    """Where the public sources are when none is given.

    `$AUTOML_CXR_SOURCES`, else `./sources`, else the shared copy `../shared/data` next to the
    checkout (or next to the current directory). The folder must hold `cohen/` and/or `kermany/`.
    """
    candidates: list[Path] = []
    env = os.environ.get("AUTOML_CXR_SOURCES")
    if env:
        candidates.append(Path(env))
    candidates += [
        Path.cwd() / "sources",
        Path.cwd().parent / "shared" / "data",
        project_root().parent / "shared" / "data",
    ]
    for c in candidates:
        if (c / "cohen").is_dir() or (c / "kermany").is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        "no public sources found (looked in: "
        f"{tried}). Run `automl-cxr data fetch` on a connected machine, or put `cohen/` and "
        "`kermany/` in a folder and pass it with --sources DIR or AUTOML_CXR_SOURCES."
    )


def source_folders(sources: str | Path | None = None) -> dict[str, Path | None]:
    """The public sources' folders under `sources` (default: `default_sources_dir()`):
    ``{"cohen", "kermany", "nih"}`` → the folder, or None where it is absent. DataError when
    the folder is missing or holds neither cohen/ nor kermany/ (nih/ is optional)."""
    src = Path(sources) if sources is not None else default_sources_dir()
    if not src.is_dir():
        raise DataError(f"sources folder {src} does not exist")
    found = {k: (src / k if (src / k).is_dir() else None) for k in ("cohen", "kermany", "nih")}
    if found["cohen"] is None and found["kermany"] is None:
        raise DataError(
            f"{src} holds neither cohen/ nor kermany/ (nih/ is optional); run "
            "`automl-cxr data fetch` or point --sources at the folder holding them"
        )
    return found
