"""`automl-cxr lungs train|info`: the lung segmenter behind the `roi` lever."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from automl_cxr.cli import app
from automl_cxr.cli._common import err_console, out_console
from automl_cxr.errors import DataError
from automl_cxr.settings import default_sources_dir, resolve_data_dir

lungs_app = typer.Typer(
    help="The lung segmenter behind the robust space's roi lever.", no_args_is_help=True
)
app.add_typer(lungs_app, name="lungs")

_OUTLINES = Path("lungmasks") / "v7labs-covid-only.zip"


def _default_out(data_dir: Path | None) -> Path:
    from automl_cxr.lungs import DEFAULT_SEGMENTER

    return resolve_data_dir(data_dir) / DEFAULT_SEGMENTER


@lungs_app.command("train")
def train(
    sources: Annotated[
        Path | None,
        typer.Option(help="Folder holding cohen/ and lungmasks/ (default: auto-detected)."),
    ] = None,
    outlines: Annotated[
        Path | None,
        typer.Option(
            help="V7's covid-only.zip (default: SOURCES/lungmasks/v7labs-covid-only.zip)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Checkpoint to write (default: DATA_DIR/lungs/segmenter.pt)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Prepared-data folder (default: $AUTOML_CXR_DATA or ./data)."
        ),
    ] = None,
    size: Annotated[int, typer.Option(help="Input side in px (a multiple of 32).")] = 128,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 12,
    holdout: Annotated[
        float, typer.Option(help="Fraction of Cohen sites held out for the reported Dice.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the held-out sites and the training.")] = 0,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            help="Leave these images (a folder per class or CSV manifest), and every other "
            "outlined image of their patients, out — e.g. an external test set."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train the U-Net lung segmenter on V7's outlines of Cohen images; report its Dice on
    whole Cohen sites it never saw; write the checkpoint with its SHA-256."""
    from automl_cxr.lungs import train_segmenter

    src = sources or default_sources_dir()
    zip_path = outlines or src / _OUTLINES
    cohen = src / "cohen"
    if not cohen.is_dir():
        raise DataError(f"{src} holds no cohen/ folder (the outlined images); use --sources")
    target = out or _default_out(data_dir)

    def log(msg: str) -> None:
        if not quiet:
            err_console.print(msg, highlight=False)

    res = train_segmenter(
        zip_path,
        cohen,
        target,
        size=size,
        epochs=epochs,
        holdout=holdout,
        seed=seed,
        exclude=exclude or (),
        log=log,
    )
    h = res.info["heldout"]
    out_console.print(
        f"[green]lung segmenter[/] → {res.path} (sha256 {res.sha256[:16]}…); Dice on "
        f"{h['images']} images of {len(h['sites'])} held-out Cohen sites: mean "
        f"{h['dice_mean']:.3f}, median {h['dice_median']:.3f}, 5th percentile {h['dice_p05']:.3f}",
        highlight=False,
    )


@lungs_app.command("info")
def info(
    path: Annotated[
        Path | None, typer.Argument(help="Checkpoint (default: the data folder's).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Prepared-data folder (default: $AUTOML_CXR_DATA or ./data)."
        ),
    ] = None,
) -> None:
    """What a segmenter checkpoint holds: hash, training and held-out Dice (JSON)."""
    from automl_cxr.lungs import load_segmenter

    seg = load_segmenter(path or _default_out(data_dir))
    out_console.print_json(json.dumps({"path": seg.path, "sha256": seg.sha256, **seg.info}))
