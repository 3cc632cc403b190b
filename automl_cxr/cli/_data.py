"""`automl-cxr data prepare|info|fetch|duplicates`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from automl_cxr.cli import app
from automl_cxr.cli._common import err_console, out_console, parse_key_values, progress_bar
from automl_cxr.cli._data_view import print_info, print_prepared
from automl_cxr.errors import ConfigError, DataError
from automl_cxr.settings import resolve_data_dir, source_folders

data_app = typer.Typer(help="Prepare datasets and inspect them.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where prepared datasets live (default: $AUTOML_CXR_DATA or ./data).",
    ),
]


def _parse_counts(items: list[str] | None) -> dict[str, int]:
    counts = {}
    for k, v in parse_key_values(items, option="--count").items():
        try:
            counts[k] = int(v)
        except ValueError:
            raise ConfigError(
                f"--count {k} must be a whole number of images, but got {k}={v}"
            ) from None
    return counts


def _check_writable(path: Path) -> None:
    """Fail before any work when `path` cannot be created or written."""
    import os

    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"data directory {path} is not writable: {probe} is a file")
    if not os.access(probe, os.W_OK):
        raise DataError(f"data directory {path} is not writable (no permission on {probe})")


@data_app.command("prepare")
def prepare(
    sources: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding cohen/, kermany/ and optionally nih/ (default: auto-detected)."
        ),
    ] = None,
    cohen: Annotated[
        Path | None, typer.Option(help="Cohen covid-chestxray-dataset folder.")
    ] = None,
    kermany: Annotated[
        Path | None, typer.Option(help="Kermany folder (holding chest_xray/).")
    ] = None,
    nih: Annotated[
        Path | None,
        typer.Option(help="NIH ChestX-ray14 folder (Data_Entry_2017_v2020.csv + images*/)."),
    ] = None,
    folder: Annotated[Path | None, typer.Option(help="Your own folder-per-class data.")] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            help="Your own CSV manifest with columns path,label and optionally patient_id."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name for --folder/--csv.")] = None,
    recipe: Annotated[
        list[str] | None,
        typer.Option(
            help="Recipe(s) to build (default: three_class, four_class, binary, and with nih/ "
            "also binary_adult, four_class_mixed)."
        ),
    ] = None,
    count: Annotated[
        list[str] | None,
        typer.Option(help="Override target counts, e.g. viral=400 or kermany:normal=300."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient sampling.")] = 0,
    skip_bad: Annotated[bool, typer.Option(help="Leave unreadable images out (listed).")] = False,
    data_dir: DataDirOpt = None,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            help="Keep these images (a folder per class or CSV manifest), and every other "
            "image of their patients, out of every recipe — e.g. an external test set."
        ),
    ] = None,
    near_duplicates: Annotated[
        bool,
        typer.Option(
            help="Search the pool for re-framed copies and same-patient films (merged, and "
            "their patients joined). --no-near-duplicates removes byte-identical copies only: "
            "for a collection already de-duplicated; recorded in the dataset, shown by `data "
            "info`."
        ),
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Decode, check and de-duplicate images once, and write dataset manifests."""
    from automl_cxr.data import prepare_recipes, prepare_table, read_csv_manifest, read_folder

    out = resolve_data_dir(data_dir)
    _check_writable(out)
    # On a terminal: a progress bar (rate, time left) and each dataset's details. With --quiet
    # or when the output is piped or redirected: warnings and one final line.
    verbose = not quiet and err_console.is_terminal
    counts: dict = {}
    if folder is not None or csv is not None:
        if folder is not None and csv is not None:
            raise ConfigError("pass either --folder or --csv, not both")
        if not name:
            raise ConfigError("--name is required with --folder/--csv (the new dataset's name)")
        if exclude:
            raise ConfigError("--exclude applies to the recipes (--sources), not --folder/--csv")
        table = read_folder(folder) if folder is not None else read_csv_manifest(csv)
        with progress_bar("decoding images", enabled=verbose) as cb:
            paths = [
                prepare_table(
                    table,
                    name=name,
                    data_dir=out,
                    kind="folder" if folder is not None else "csv",
                    origin=str(folder or csv),
                    skip_bad=skip_bad,
                    progress=cb,
                    near_duplicates=near_duplicates,
                )
            ]
    else:
        if cohen is None and kermany is None and nih is None:
            found = source_folders(sources)
            cohen, kermany, nih = found["cohen"], found["kermany"], found["nih"]
        counts = _parse_counts(count)
        with progress_bar("decoding images", enabled=verbose) as cb:
            paths = prepare_recipes(
                cohen=cohen,
                kermany=kermany,
                nih=nih,
                data_dir=out,
                recipes=recipe or None,
                counts=counts,
                seed=seed,
                skip_bad=skip_bad,
                progress=cb,
                exclude=exclude or (),
                near_duplicates=near_duplicates,
            )
    print_prepared(paths, out, verbose=verbose)


def _info_payload(ds) -> dict:
    from automl_cxr.data import (
        age_by_class,
        site_label_table,
        source_label_alignment,
    )

    meta = ds.meta
    align = source_label_alignment(ds.manifest)
    keys = (
        "classes",
        "patients",
        "sources",
        "distinct_patients",
        "split_groups",
        "images_per_patient",
        "duplicates_removed",
        "duplicates",
        "label_conflicts",
        "copies_removed",
        "near_duplicate_search",
        "merged_patient_groups",
        "patients_with_several_labels",
        "rejected",
        "excluded",
        "shortfalls",
        "unlicensed_images",
        "manifest_hash",
        "kind",
        "positive",
        "recipe",
        "age_filter",
        "pool_labels",
        "cohen_findings",
    )
    payload = {"dataset": ds.name, "images": len(ds), **{k: meta.get(k) for k in keys}}
    # Recomputed from the manifest, so datasets prepared by older versions show them too.
    payload["sources"] = {
        k: int(v) for k, v in ds.manifest["source"].value_counts().sort_index().items()
    }
    payload["source_label_table"] = align["contingency"]
    payload["cramers_v"] = align["cramers_v"]
    payload["age_by_class"] = age_by_class(ds.manifest, ds.classes)
    payload["sites"] = site_label_table(ds.manifest)
    payload["patients_at_several_sites"] = meta.get("patients_at_several_sites")
    payload["near_duplicates"] = ds.near_duplicates
    payload["source_label_alignment"] = align
    return payload


@data_app.command("info")
def info(
    dataset: Annotated[
        str | None,
        typer.Argument(help="Prepared dataset name, e.g. three_class (default: all of them)."),
    ] = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Counts per class, source and site, Cramér's V, ages, patients, duplicates, rejects."""
    from automl_cxr.data import list_datasets, load_dataset

    root = resolve_data_dir(data_dir)
    if dataset is None:
        names = list_datasets(root)
        if not names:
            raise DataError(
                f"{root} holds no prepared datasets; run `automl-cxr data prepare --sources DIR`"
            )
        payloads = [_info_payload(load_dataset(n, root)) for n in names]
        if as_json:
            typer.echo(json.dumps(payloads, indent=2, default=str))
            return
        t = Table(title=f"prepared datasets in {root}")
        for col in ("dataset", "images", "classes", "sources", "Cramér's V", "share children"):
            t.add_column(col)
        for p in payloads:
            ages = p["age_by_class"].values()
            kids = sum(a["children"] for a in ages)
            known = kids + sum(a["adults"] for a in ages)
            t.add_row(
                p["dataset"],
                str(p["images"]),
                ", ".join(f"{k} {v}" for k, v in p["classes"].items()),
                ", ".join(f"{k} {v}" for k, v in p["sources"].items()),
                f"{p['cramers_v']:.2f}",
                f"{100 * kids / known:.0f} %" if known else "-",
            )
        out_console.print(t)
        return
    ds = load_dataset(dataset, root)
    payload = _info_payload(ds)
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    print_info(payload, ds.classes)


@data_app.command("fetch")
def fetch(
    dest: Annotated[
        Path, typer.Option(help="Where to put cohen/ and kermany/ (and where nih/ goes).")
    ] = Path("sources"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the network.")] = 10.0,
) -> None:
    """Download the public sources (needs internet; offline it says where to put them)."""
    from automl_cxr.data._fetch import fetch_sources

    for line in fetch_sources(dest, timeout=timeout):
        out_console.print(line)


@data_app.command("duplicates")
def duplicates(
    target: Annotated[
        str,
        typer.Argument(
            help="A folder (one sub-folder per class), a CSV manifest, or a prepared dataset name."
        ),
    ],
    against: Annotated[
        str | None,
        typer.Option(
            help="A prepared dataset (or folder / CSV) to compare TARGET with (default: pairs "
            "within TARGET)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for pairs.csv and contact_sheet.html (default: duplicates-NAME)."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Copies of one radiograph (cropped, padded, resized, re-windowed, re-encoded) and films of
    one patient: a table and an HTML contact sheet with the matched keypoints."""
    import pandas as pd

    from automl_cxr.data import features_of_files, list_datasets, load_dataset, read_external
    from automl_cxr.data._contact import contact_sheet, duplicate_pairs

    root = resolve_data_dir(data_dir)

    def features_of(name: str):
        p = Path(name)
        if p.is_dir() or (p.is_file() and p.suffix.lower() == ".csv"):
            paths = read_external(p)["path"].astype(str).tolist()
            with progress_bar(f"keypoints of {p.name}", enabled=not quiet) as bar:
                feats = features_of_files(paths, progress=bar)
            return p.stem if p.is_file() else p.name, paths, feats
        if name in list_datasets(root):
            ds = load_dataset(name, root)
            with progress_bar(f"keypoints of {name}", enabled=not quiet) as bar:
                feats = ds.local_features(progress=bar)
            return name, ds.manifest["path"].astype(str).tolist(), feats
        raise DataError(
            f"{name!r} is neither a folder, a CSV manifest nor a prepared dataset in {root}; "
            f"datasets there: {list_datasets(root)}"
        )

    name, paths, feats = features_of(target)
    base = features_of(against) if against else None
    with progress_bar("verifying candidates", enabled=not quiet) as bar:
        pairs = duplicate_pairs(
            feats, paths, base[2] if base else None, base[1] if base else None, progress=bar
        )
    out = out or Path(f"duplicates-{name}" + (f"-vs-{base[0]}" if base else ""))
    out.mkdir(parents=True, exist_ok=True)
    pairs.to_csv(out / "pairs.csv", index=False)
    index = {p: (feats, i) for i, p in enumerate(paths)}
    if base:
        index.update({p: (base[2], i) for i, p in enumerate(base[1])})

    def lookup(p: str):
        f, i = index[p]
        return f.image(i)

    title = f"duplicates in {name}" + (f" against {base[0]}" if base else "")
    sheet = contact_sheet(pairs, out / "contact_sheet.html", features=lookup, title=title)
    t = Table(title=f"{len(pairs)} pair(s): {title}")
    for col in ("a", "b", "kind", "inliers"):
        t.add_column(col, overflow="fold")
    for r in pairs.head(20).itertuples(index=False):
        kind = r.kind.replace("_", " ")
        if pd.notna(r.correlation):  # found by the aligned texture
            kind += f" (texture {r.correlation:.2f})"
        t.add_row(Path(r.a).name, Path(r.b).name, kind, str(r.inliers))
    if not quiet:
        out_console.print(t)
    typer.echo(f"wrote {out / 'pairs.csv'} and {sheet}")
