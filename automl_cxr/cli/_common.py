"""Helpers shared by the CLI modules: consoles, progress bars, key=value parsing."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from rich.console import Console

from automl_cxr._progress import progress_bar as _progress_bar
from automl_cxr.errors import ConfigError

__all__ = ["err_console", "name_lines", "out_console", "parse_key_values", "progress_bar"]


def _console(*, stderr: bool) -> Console:
    """A console that wraps long messages at word boundaries on a terminal (to its width) and
    keeps each message on one line when the output is piped or redirected (logs, grep, CI)."""
    console = Console(stderr=stderr)
    console.soft_wrap = not console.is_terminal
    return console


out_console = _console(stderr=False)
err_console = _console(stderr=True)


def name_lines(text: str, width: int) -> str:
    """`text` with every word longer than `width` broken into lines after its `_` (never inside a
    name part), so a narrow table column shows `tf_efficientnet_` / `lite1`, not `..._l` / `ite1`.
    """
    words = []
    for word in text.split(" "):
        if len(word) <= width:
            words.append(word)
            continue
        lines = [""]
        for part in re.split(r"(?<=_)", word):
            if lines[-1] and len(lines[-1]) + len(part) > width:
                lines.append("")
            lines[-1] += part
        words.append("\n".join(lines))
    return " ".join(words)


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
