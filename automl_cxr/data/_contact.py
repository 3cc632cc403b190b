"""`data duplicates`: the duplicate finder as a report: a table of pairs, and an HTML contact
sheet showing each pair side by side with its matched keypoints, to judge the evidence by eye."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from automl_cxr.data._duplicates import find_matches, inlier_matches
from automl_cxr.data._image import decode_gray
from automl_cxr.data._keypoints import WORK_SIDE, LocalFeatures, work_image

__all__ = ["PAIR_COLUMNS", "contact_sheet", "duplicate_pairs"]

PAIR_COLUMNS = [
    "a",
    "b",
    "kind",
    "inliers",
    "votes",
    "cells",
    "scale_x",
    "scale_y",
    "rotation",
    "tx",
    "ty",
    "correlation",
]


def duplicate_pairs(
    query: LocalFeatures,
    query_paths: Sequence[str],
    base: LocalFeatures | None = None,
    base_paths: Sequence[str] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Every pair the finder confirms, as a table (`PAIR_COLUMNS`), most inliers first.

    Without `base`: pairs within the query images; with it: query image (`a`) × base image
    (`b`)."""
    bp = query_paths if base is None else base_paths
    matches = find_matches(query, base, paths=query_paths, base_paths=bp, progress=progress)
    rows = [
        {
            "a": str(query_paths[m.a]),
            "b": str(bp[m.b]),
            "kind": m.kind,
            "inliers": m.inliers,
            "votes": m.votes,
            **m.transform,
            "correlation": m.correlation,
        }
        for m in matches
    ]
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    return df.sort_values(["inliers", "a", "b"], ascending=[False, True, True]).reset_index(
        drop=True
    )


def _pair_png(a_path: str, b_path: str, fa, fb) -> bytes:
    """Both images side by side (at the finder's working size), inlier matches drawn as lines."""
    import cv2

    a, b = (work_image(decode_gray(p, min_side=1).pixels) for p in (a_path, b_path))
    pa, pb, _ = inlier_matches(fa, fb)
    h = max(a.shape[0], b.shape[0])
    gap = 8
    canvas = np.full((h, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a[..., None]
    canvas[: b.shape[0], a.shape[1] + gap :] = b[..., None]
    off = a.shape[1] + gap
    rng = np.random.default_rng(0)
    for (xa, ya), (xb, yb) in zip(pa * WORK_SIDE, pb * WORK_SIDE, strict=True):
        colour = tuple(int(c) for c in rng.integers(40, 256, 3))
        p1, p2 = (int(xa), int(ya)), (int(xb) + off, int(yb))
        cv2.line(canvas, p1, p2, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, p1, 3, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, p2, 3, colour, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", canvas[..., ::-1])
    return buf.tobytes() if ok else b""


def contact_sheet(
    pairs: pd.DataFrame,
    out: str | Path,
    *,
    features: Callable[[str], tuple[np.ndarray, np.ndarray]],
    title: str,
    limit: int = 200,
) -> Path:
    """Write an HTML page (images embedded) with one figure per pair of `pairs` (the first
    `limit`), each with both names, the kind and the evidence. `features(path)` gives a path's
    (points, descriptors)."""
    out = Path(out)
    figs = []
    for r in pairs.head(limit).itertuples(index=False):
        png = base64.b64encode(_pair_png(r.a, r.b, features(r.a), features(r.b))).decode()
        cap = (
            f"<b>{html.escape(Path(r.a).name)}</b> ~ <b>{html.escape(Path(r.b).name)}</b>: "
            f"{html.escape(str(r.kind).replace('_', ' '))}, {r.inliers} inliers over {r.cells} "
            f"of 16 cells, {r.votes} votes; scale {r.scale_x:.3f} x {r.scale_y:.3f}, rotation "
            f"{r.rotation:+.1f}°"
            + (
                f"; found by aligned texture (median cell correlation {r.correlation:.2f})"
                if pd.notna(r.correlation)
                else ""
            )
        )
        figs.append(
            f'<figure><img alt="{html.escape(Path(r.a).name)} and '
            f'{html.escape(Path(r.b).name)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{cap}<br><small>{html.escape(r.a)}<br>{html.escape(r.b)}</small>"
            "</figcaption></figure>"
        )
    more = (
        f"<p>{len(pairs) - limit} more pairs are in the table, not shown here.</p>"
        if len(pairs) > limit
        else ""
    )
    body = "\n".join(figs) or "<p>No pair found.</p>"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em;max-width:100%}"
        "figure{margin:0 0 1.5em 0}img{max-width:100%;height:auto;display:block}"
        "figcaption{font-size:0.9em;overflow-wrap:anywhere}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(pairs)} pair(s). Lines join the RANSAC inliers "
        "(keypoints the fitted transform maps onto each other).</p>"
        f"{body}{more}</body></html>"
    )
    return out
