"""Helpers shared by the CLI modules: consoles, progress bars, key=value parsing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console

from automl_cxr._progress import progress_bar as _progress_bar
from automl_cxr.errors import ConfigError

__all__ = ["err_console", "out_console", "parse_key_values", "progress_bar"]

out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator:
    """Yields a `(done, total)` callback that drives a rich progress bar on stderr."""
    with _progress_bar(description, enabled=enabled, console=err_console) as update:
        yield update


def parse_key_values(items: list[str] | None, *, option: str) -> dict[str, str]:
    """`["a=1", "b=2,c=3"]` → {"a": "1", "b": "2", "c": "3"}; malformed items are errors."""
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ConfigError(f"{option} expects KEY=VALUE, but got {part!r}")
            out[key.strip()] = value.strip()
    return out
