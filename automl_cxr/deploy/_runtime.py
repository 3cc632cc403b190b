"""Optional runtime dependencies of the deploy layer (the `export` extra), imported on demand.

Shared by export, prediction and Grad-CAM so that none of them imports another for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from automl_cxr.errors import MissingDependency

__all__ = ["onnx_session", "require"]


def require(module: str, package: str, what: str, extra: str = "export") -> ModuleType:
    """Import an optional dependency, or raise :class:`MissingDependency` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(package, extra, what) from None


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for an ONNX file (quiet logging)."""
    ort = require("onnxruntime", "onnxruntime", "running the ONNX model")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
