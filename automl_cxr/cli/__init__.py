"""The `automl-cxr` command line: every subcommand hangs off one Typer app."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from automl_cxr.errors import AutomlCxrError

__all__ = ["app", "main"]

app = typer.Typer(
    name="automl-cxr",
    help="AutoML for transfer learning on chest X-rays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_err = Console(stderr=True)


def _register() -> None:
    # Each subcommand module adds its commands to `app`; imported lazily-light modules only.
    from automl_cxr.cli import _data, _models, _search  # noqa: F401


_register()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: AutomlCxrError → one red line on stderr and exit code 2."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except AutomlCxrError as exc:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        _err.print("[bold red]interrupted[/]")
        return 130
    except SystemExit as exc:  # typer/click --help and usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            _err.print("[bold red]aborted[/]")
            return 130
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
