"""automl-cxr: AutoML for transfer learning on chest X-ray classification."""

from __future__ import annotations

from automl_cxr.errors import AutomlCxrError

__all__ = ["AutomlCxrError", "__version__"]

__version__ = "0.1.0"
