"""Console rendering for `data prepare` and `data info` (the commands are in `_data.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from automl_cxr.cli._common import err_console, out_console

__all__ = ["print_info", "print_prepared"]


def print_prepared(paths: list[Path], out: Path, *, verbose: bool) -> None:
    """Each prepared dataset's counts, shortfalls, exclusions and rejects (verbose), or one
    line for all. Warnings either way: a CSV/folder's notes, and a target the user set with
    --count that the sources cannot meet (the recipes' own shortfalls are in `data info`)."""
    summary, n_short, n_rejected = [], 0, 0
    for p in paths:
        meta = json.loads((p / "dataset.json").read_text())
        counts_txt = ", ".join(f"{k} {v}" for k, v in meta["classes"].items())
        summary.append(f"{meta['name']} {meta['images']}")
        n_rejected += len(meta["rejected"])
        if verbose:
            out_console.print(
                f"[green]prepared[/] {meta['name']}: {meta['images']} images ({counts_txt}) → {p}"
            )
        if meta.get("kind") in ("csv", "folder"):
            for note in meta.get("notes") or []:
                err_console.print(f"[bold yellow]warning:[/] {note}", highlight=False)
        for lab, s in meta.get("shortfalls", {}).items():
            n_short += 1
            text = f"{lab}: target {s['target']}, only {s['available']} available"
            if verbose:
                out_console.print(f"  [yellow]shortfall[/] {text}")
            elif lab in meta.get("counted", ()):
                err_console.print(
                    f"[bold yellow]warning:[/] shortfall {text} (--count)", highlight=False
                )
        ex = meta.get("excluded_sets")
        if ex and verbose:
            out_console.print(
                f"  [yellow]excluded[/] {ex['images_removed']} image(s) of "
                f"{ex['patients_removed']} patient(s) ({ex['images_matched']} matched by --exclude)"
            )
        if meta["rejected"] and verbose:
            out_console.print(
                f"  [yellow]rejected[/] {len(meta['rejected'])} file(s) (see data info)"
            )
    if not verbose:
        out_console.print(
            f"prepared {len(paths)} dataset(s) in {out} ({', '.join(summary)} images; "
            f"{n_short} shortfall(s), {n_rejected} file(s) rejected: see `automl-cxr data info`)",
            highlight=False,
        )


def info_rows(info: dict) -> list[tuple[str, str]]:
    ipp = info["images_per_patient"]
    off = "not searched (--no-near-duplicates)"
    searched = info.get("near_duplicate_search") is not False  # older datasets: searched
    return [
        ("images", str(info["images"])),
        ("distinct patients", str(info["distinct_patients"])),
        ("split groups (patients merged by near-duplicates)", str(info["split_groups"])),
        ("images per patient", f"mean {ipp['mean']}, max {ipp['max']}"),
        ("duplicates removed", str(info["duplicates_removed"])),
        ("label conflicts (same bytes, two labels)", str(len(info["label_conflicts"]))),
        (
            "copies merged (same radiograph re-framed)",
            str(info.get("copies_removed", 0)) if searched else off,
        ),
        (
            "same-radiograph or same-patient pairs",
            str(len(info["near_duplicates"])) if searched else off,
        ),
        ("patients with several labels", str(info["patients_with_several_labels"]["count"])),
        ("files rejected", str(len(info["rejected"]))),
        ("images without a license upstream", str(info["unlicensed_images"])),
    ]


def fmt_age(a: dict) -> tuple[str, ...]:
    if a["age_known"]:
        age = f"{a['median']:g} [{a['q1']:g}-{a['q3']:g}], {a['min']:g}-{a['max']:g}"
    else:
        age = "-"
    share = "-" if a["share_children"] is None else f"{100 * a['share_children']:.0f} %"
    return (f"{a['age_known']}/{a['images']}", age, str(a["children"]), share)


def print_info(payload: dict, classes: list[str]) -> None:
    meta = payload
    t = Table(title=f"dataset {payload['dataset']} ({meta.get('kind')})")
    t.add_column("class")
    t.add_column("images", justify="right")
    t.add_column("patients", justify="right")
    for lab in classes:
        t.add_row(lab, str(meta["classes"].get(lab, 0)), str(meta["patients"].get(lab, 0)))
    out_console.print(t)
    st = Table(title=f"source x class (Cramér's V {payload['cramers_v']:.2f})")
    st.add_column("source")
    for lab in classes:
        st.add_column(lab, justify="right")
    for src, row in payload["source_label_table"].items():
        st.add_row(src, *(str(row.get(lab, 0)) for lab in classes))
    out_console.print(st)
    at = Table(title="age per class (years)")
    for col in ("class", "age known", "median [IQR], range", "children", "share children"):
        at.add_column(col, justify="left" if col == "class" else "right")
    for lab in classes:
        at.add_row(lab, *fmt_age(payload["age_by_class"][lab]))
    out_console.print(at)
    s = Table(show_header=False, box=None)
    for k, v in [
        ("sources", ", ".join(f"{a} {b}" for a, b in meta["sources"].items())),
        ("sites", str(len(payload["sites"]))),
        *info_rows(meta),
    ]:
        s.add_row(k, v)
    several = payload.get("patients_at_several_sites") or {}
    if several.get("count"):
        s.add_row("patients at several sites", str(several["count"]))
    out_console.print(s)
    recipe = meta.get("recipe") or {}
    for note in recipe.get("notes") or []:
        out_console.print(f"note: {note}")
    for src, labels in (meta.get("pool_labels") or {}).items():
        unused = {k: v for k, v in labels.items() if k in ("other", "uncertain")}
        if unused:
            txt = ", ".join(f"{k} {v}" for k, v in unused.items())
            out_console.print(
                f"{src} images outside the four classes: {txt} (other: a non-COVID finding, "
                "used by binary_adult; uncertain: never used)"
            )
    for src, reasons in (meta.get("excluded") or {}).items():
        for why, n in reasons.items():
            out_console.print(f"excluded from {src}: {n} ({why})")
    for key, f in ((meta.get("age_filter") or {}).get("per_pool_key") or {}).items():
        if f["left_out_younger"] or f["kept_age_unknown"]:
            out_console.print(
                f"age filter {key}: {f['left_out_younger']} younger than "
                f"{meta['age_filter']['min_age']:g} left out, {f['kept_age_unknown']} of "
                "unknown age kept"
            )
    for lab, sf in (meta.get("shortfalls") or {}).items():
        out_console.print(
            f"[yellow]shortfall[/] {lab}: target {sf['target']}, available {sf['available']}"
        )
    for r in meta["rejected"][:20]:
        out_console.print(f"[yellow]rejected[/] {r['path']}: {r['reason']}")
    if payload["source_label_alignment"]["warning"]:
        err_console.print(
            f"[bold yellow]warning:[/] {payload['source_label_alignment']['warning']}"
        )
