"""One root exception type; the CLI turns any of these into a clear message and exit code 2."""

from __future__ import annotations

__all__ = [
    "AutomlCxrError",
    "ConfigError",
    "DataError",
    "ImageDecodeError",
    "MissingDependency",
    "SearchAborted",
    "StorageError",
    "TrialFailed",
    "WeightsUnavailable",
]


class AutomlCxrError(Exception):
    """Root of every error automl-cxr raises on purpose (bad input, missing data, ...)."""


class ConfigError(AutomlCxrError, ValueError):
    """A parameter, name or configuration value is not allowed."""


class DataError(AutomlCxrError):
    """A dataset, manifest or data directory is missing or inconsistent."""


class ImageDecodeError(DataError):
    """An image file cannot be decoded into a radiograph."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class WeightsUnavailable(AutomlCxrError):
    """Pretrained weights were asked for but none can be found (never a silent random init)."""


class StorageError(AutomlCxrError):
    """An Optuna storage cannot be opened or a study is missing."""


class TrialFailed(AutomlCxrError):
    """One trial cannot go on (NaN loss, out of memory, ...); the study continues."""

    def __init__(self, reason: str, *, kind: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class SearchAborted(AutomlCxrError):
    """A search stopped on purpose (e.g. every recent trial failed), with the last reason."""


class MissingDependency(AutomlCxrError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, what: str = "") -> None:
        need = f" for {what}" if what else ""
        super().__init__(
            f"the optional package {package!r} is needed{need} but is not installed; "
            f"install it with `pip install 'automl-cxr[{extra}]'`"
        )
        self.package = package
        self.extra = extra
