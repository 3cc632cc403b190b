"""`data fetch`: download the public sources on a connected machine; fail fast offline."""

from __future__ import annotations

import shutil
import socket
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from automl_cxr.errors import DataError

__all__ = ["NIH_URL", "SOURCES", "fetch_sources"]

SOURCES = {
    "cohen": {
        "url": "https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip",
        "host": "github.com",
        "inner": "covid-chestxray-dataset-master",
        "keep": ("metadata.csv", "images"),
    },
    "kermany": {
        # Kermany, Zhang, Goldbaum (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2
        "url": "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
        "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded",
        "host": "data.mendeley.com",
        "inner": "CellData/chest_xray",
        "keep": ("train", "test"),
    },
}

NIH_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_HOST = "nihcc.app.box.com"

_NIH_MANUAL = (
    "NIH ChestX-ray14 (optional; the third source of binary_adult and four_class_mixed) lives "
    f"at {NIH_URL} (12 archives, about 45 GB, download them in a browser): unpack them into "
    "{dest}/nih/ next to Data_Entry_2017_v2020.csv, so that it holds images_001/ ... "
    "images_012/ (any images*/ folders)."
)
_MANUAL = (
    "Put the sources there by hand instead: {dest}/cohen/ (metadata.csv + images/ from "
    "github.com/ieee8023/covid-chestxray-dataset) and {dest}/kermany/chest_xray/{{train,test}}/"
    "{{NORMAL,PNEUMONIA}}/ (ZhangLabData.zip, CellData/chest_xray, from doi:10.17632/rscbjbr9sj.2)"
    ", and optionally {dest}/nih/ (" + NIH_URL + ": Data_Entry_2017_v2020.csv + images*/), "
    "then run `automl-cxr data prepare --sources {dest}`."
)


def _reachable(host: str, timeout: float) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_sources(dest: str | Path, *, timeout: float = 10.0) -> Iterator[str]:
    """Download and unpack Cohen and Kermany into `dest`; yields progress lines.

    NIH ChestX-ray14 is not downloaded (its release is a 45 GB Box folder): the last line
    says where it lives and where to unpack it. Offline, every source fails fast with the
    same instructions."""
    dest = Path(dest)
    for name, src in SOURCES.items():
        target = dest / name
        if target.is_dir() and any(target.iterdir()):
            yield f"{name}: already present at {target}"
            continue
        if not _reachable(src["host"], timeout):
            raise DataError(
                f"cannot reach {src['host']} (no network?) to download {name}. "
                + _MANUAL.format(dest=dest)
            )
        yield f"{name}: downloading {src['url']}"
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / f"{name}.zip"
            try:
                with (
                    urllib.request.urlopen(src["url"], timeout=timeout) as r,
                    archive.open("wb") as f,
                ):
                    shutil.copyfileobj(r, f, length=1 << 20)
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DataError(
                    f"download of {name} failed ({exc}). " + _MANUAL.format(dest=dest)
                ) from None
            inner = Path(tmp) / src["inner"]
            out = target / "chest_xray" if name == "kermany" else target
            out.mkdir(parents=True, exist_ok=True)
            for part in src["keep"]:
                shutil.move(str(inner / part), out / part)
        yield f"{name}: ready at {target}"
    nih = dest / "nih"
    if nih.is_dir() and any(nih.iterdir()):
        yield f"nih: already present at {nih}"
    elif not _reachable(NIH_HOST, timeout):
        raise DataError(
            f"cannot reach {NIH_HOST} (no network?) to show where NIH ChestX-ray14 is. "
            + _NIH_MANUAL.format(dest=dest)
        )
    else:
        yield "nih: not downloaded automatically. " + _NIH_MANUAL.format(dest=dest)
