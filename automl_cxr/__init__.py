"""automl-cxr: AutoML for transfer learning on chest X-ray classification.

The Python API (`prepare`, `search`, `report`, `export`, `load_model`; see `automl_cxr.api`)
is imported on first use, so `import automl_cxr` stays light.
"""

from __future__ import annotations

from typing import Any

from automl_cxr.errors import AutomlCxrError

__all__ = [
    "AutomlCxrError",
    "Model",
    "Report",
    "__version__",
    "export",
    "load_model",
    "prepare",
    "report",
    "search",
]

__version__ = "0.1.0"

_API = {"Model", "Report", "export", "load_model", "prepare", "report", "search"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from automl_cxr import api

        return getattr(api, name)
    raise AttributeError(f"module 'automl_cxr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
