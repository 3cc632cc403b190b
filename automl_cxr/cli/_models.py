"""`automl-cxr models list|check`: the backbone catalogue and where its weights come from."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from automl_cxr.cli import app
from automl_cxr.cli._common import out_console

models_app = typer.Typer(help="Backbone catalogue and pretrained weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _weights_status(name: str) -> dict:
    """Where pretrained weights would come from right now (nothing is loaded or hashed)."""
    from automl_cxr.errors import WeightsUnavailable
    from automl_cxr.models import resolve_weights

    try:
        src = resolve_weights(name, checksum=False)
    except WeightsUnavailable:
        return {"kind": "none", "path": None, "description": "no weights on this machine"}
    return {"kind": src.kind, "path": src.path, "description": src.description}


def _weights_cell(w: dict) -> str:
    kind = w["kind"]
    if kind == "none":
        return "[red]none[/]"
    if kind == "download":
        return "[yellow]download needed[/]"
    if kind == "package":
        return f"[green]package[/] {w['description'].removeprefix('PyPI package ')}"
    return f"[green]{kind}[/] {Path(w['path']).name if w['path'] else ''}"


@models_app.command("list")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """The catalogue: family, native input size, parameters, freezable stages, weights."""
    from automl_cxr.models import arch_info, list_backbones

    rows = []
    for spec in list_backbones():
        info = arch_info(spec.arch)
        rows.append(
            {
                "name": spec.name,
                "label": spec.label,
                "family": spec.family,
                "paper": spec.paper,
                "input_size": spec.input_size,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "num_features": info.num_features,
                "params": info.num_params,
                "num_stages": info.num_stages,
                "offline_package": spec.offline_weights,
                "weights": _weights_status(spec.name),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="backbones (any other timm model name works too)")
    t.add_column("name", no_wrap=True)
    t.add_column("family")
    t.add_column("paper")
    for col in ("input", "params", "stages"):
        t.add_column(col, justify="right")
    t.add_column("pretrained weights")
    for r in rows:
        t.add_row(
            r["name"],
            r["family"],
            "✓" if r["paper"] else "",
            str(r["input_size"]),
            f"{r['params'] / 1e6:.1f}M",
            str(r["num_stages"]),
            _weights_cell(r["weights"]),
        )
    out_console.print(t)


@models_app.command("check")
def check_cmd(
    name: Annotated[str, typer.Argument(help="Backbone (catalogue or timm name).")],
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Checkpoint file to use for this backbone.")
    ] = None,
    gray_mode: Annotated[str, typer.Option(help="replicate or sum.")] = "replicate",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Build NAME with pretrained weights exactly as a search would; print their source."""
    import dataclasses

    import torch

    from automl_cxr.models import ModelConfig, build_model

    t0 = time.perf_counter()
    config = ModelConfig(
        backbone=name,
        num_classes=2,
        pretrained=True,
        weights_file=str(weights) if weights is not None else None,
        gray_mode=gray_mode,
    )
    model = build_model(config).eval()
    size = model.spec.input_size
    with torch.no_grad():
        logits = model(torch.full((1, 1, size, size), 0.5))
    if not torch.isfinite(logits).all():
        from automl_cxr.errors import WeightsUnavailable

        raise WeightsUnavailable(f"backbone {name!r} gives non-finite outputs with these weights")
    total, _ = model.param_counts()
    ws = model.weight_source
    payload = {
        "backbone": model.spec.name,
        "family": model.spec.family,
        "input_size": size,
        "num_features": model.num_features,
        "num_stages": model.num_stages,
        "params": total,
        "weights": dataclasses.asdict(ws),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    s = Table(show_header=False, box=None, title=f"{model.spec.name}: pretrained weights ok")
    s.add_column(style="bold")
    s.add_column()
    s.add_row("source", f"{ws.kind} ({ws.description})")
    s.add_row("file", ws.path or "-")
    s.add_row("format", ws.format or "-")
    s.add_row("sha256", ws.sha256 or "-")
    s.add_row("family", model.spec.family)
    s.add_row("input", f"{size} px, mean {model.spec.mean}, std {model.spec.std}")
    s.add_row("params", f"{total:,} ({model.num_features} features, {model.num_stages} stages)")
    s.add_row("built in", f"{payload['seconds']} s")
    out_console.print(s)
