"""The `automl-cxr` command line: every subcommand hangs off one Typer app."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from automl_cxr.cli._common import err_console as _err
from automl_cxr.errors import AutomlCxrError

__all__ = ["app", "main"]

app = typer.Typer(
    name="automl-cxr",
    help="AutoML for transfer learning on chest X-rays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Each subcommand module adds its commands to `app`; imported lazily-light modules only.
    from automl_cxr.cli import _data, _deploy, _lungs, _models, _report, _search  # noqa: F401


_register()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: AutomlCxrError → one red line on stderr and exit code 2;
    usage errors → click's message and its exit code (2); never a traceback for bad input."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except AutomlCxrError as exc:
        # The message is literal text: `[postgres]` in a pip extra is no markup tag.
        _err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        _err.print("[bold red]interrupted[/]")
        return 130
    except SystemExit as exc:  # --help, typer.Exit
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        # Typer vendors click (typer._click): recognise its exceptions by shape, not by class.
        if callable(getattr(exc, "show", None)) and isinstance(
            getattr(exc, "exit_code", None), int
        ):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            _err.print("[bold red]aborted[/]")
            return 130
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
