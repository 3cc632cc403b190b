"""Console output fits an 80-column terminal (issue 26 §3): every line of `search`, `report` and
`data info` fits, long messages wrap at word boundaries, and table cells break names only at `_`.
Run as a user's terminal would see it: a real subprocess that believes it writes to a terminal
(rich's TTY_COMPATIBLE) of the given width."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from automl_cxr.cli._common import name_lines

_STYLE = re.compile(r"\x1b\[[0-9;]*m")  # bold, dim (NO_COLOR keeps them)
_CURSOR = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]")  # the live display's cursor moves


def _run(args: list[str], columns: int, cwd: Path) -> list[str]:
    env = {**os.environ, "TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": str(columns)}
    proc = subprocess.run(
        [sys.executable, "-m", "automl_cxr", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = _CURSOR.sub("\n", _STYLE.sub("", proc.stdout + "\n" + proc.stderr))
    return [line.rstrip() for line in text.splitlines()]


def _too_wide(lines: list[str], columns: int = 80) -> list[str]:
    return [f"{len(line)}: {line}" for line in lines if len(line) > columns]


def test_name_lines_breaks_only_after_underscores() -> None:
    assert name_lines("tf_efficientnet_lite1 7/8 linear", 16) == (
        "tf_efficientnet_\nlite1 7/8 linear"
    )
    assert name_lines("inception_resnet_v2", 12) == "inception_\nresnet_v2"
    assert name_lines("adult_holdout_binary", 14) == "adult_holdout_\nbinary"
    # a part longer than the width stays whole (the table folds it, as before), short words
    # are untouched
    assert name_lines("efficientnetlite_b0", 8) == "efficientnetlite_\nb0"
    assert name_lines("best mobilenetv2_100", 16) == "best mobilenetv2_100"


def test_report_fits_80_columns_and_keeps_names_whole(smoke_study: Path, tmp_path: Path) -> None:
    args = ["report", str(smoke_study), "--out", str(tmp_path / "r"), "--no-html"]
    narrow = _run(args, 80, tmp_path)
    assert not _too_wide(narrow), _too_wide(narrow)
    wide = _run(args, 250, tmp_path)
    text_narrow, text_wide = "\n".join(narrow), "\n".join(wide)
    assert "Beside the seed paper" in text_narrow and "top 2 of 2" in text_narrow
    # Each backbone's name parts appear as often at 80 columns as at 250: no part was cut.
    for part in ("test_", "efficientnet", "resnet"):
        assert text_narrow.count(part) == text_wide.count(part) > 0, part
    # the long shortcut warning wraps instead of running off as one line
    assert any(line.startswith("warning (shortcut risk") for line in narrow)


def test_data_info_and_search_fit_80_columns(prepared_dir: Path, tmp_path: Path) -> None:
    info = _run(["data", "info", "binary_adult", "--data-dir", str(prepared_dir)], 80, tmp_path)
    assert not _too_wide(info), _too_wide(info)
    warning = next(i for i, line in enumerate(info) if line.startswith("warning: source and"))
    assert "DeGrave" not in info[warning] and "DeGrave" in " ".join(info[warning:])
    search = _run(
        [
            "search",
            "--dataset",
            "three_class",
            "--profile",
            "smoke",
            "--trials",
            "1",
            "--data-dir",
            str(prepared_dir),
            "--storage",
            str(tmp_path / "s.db"),
        ],
        80,
        tmp_path,
    )
    assert not _too_wide(search), _too_wide(search)
    assert any(line.startswith("best balanced_accuracy") for line in search)


def test_piped_output_keeps_messages_on_one_line(prepared_dir: Path) -> None:
    """Redirected to a file (no terminal), a message stays one line whatever its length: logs
    and grep see whole messages."""
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "FORCE_COLOR")}
    env["COLUMNS"] = "80"
    proc = subprocess.run(
        [sys.executable, "-m", "automl_cxr", "data", "info", "binary_adult"]
        + ["--data-dir", str(prepared_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [s for s in proc.stderr.splitlines() if s.startswith("warning: source and")]
    assert "DeGrave" in line and len(line) > 200


def _small_csv(shared_data: Path, path: Path) -> Path:
    """Twelve Cohen COVID-19 and twelve NIH films as a user's CSV manifest."""
    import pandas as pd

    covid = sorted((shared_data / "cohen" / "images").glob("*.jp*g"))[:12]
    normal = sorted((shared_data / "nih" / "images").glob("*.png"))[:12]
    rows = [(str(p), "covid", f"c{i}") for i, p in enumerate(covid)]
    rows += [(str(p), "normal", f"n{i}") for i, p in enumerate(normal)]
    pd.DataFrame(rows, columns=["path", "label", "patient_id"]).to_csv(path, index=False)
    return path


def test_prepare_is_one_line_when_piped_and_detailed_on_a_terminal(
    shared_data: Path, tmp_path: Path, capsys
) -> None:
    """Issue 26 §1: `data prepare` shows its progress and details on a terminal, and prints one
    final line with --quiet or when its output is not a terminal."""
    from automl_cxr.cli import main

    csv = _small_csv(shared_data, tmp_path / "x.csv")
    args = ["data", "prepare", "--csv", str(csv), "--name", "mine"]
    assert main([*args, "--data-dir", str(tmp_path / "piped")]) == 0  # capsys: not a terminal
    cap = capsys.readouterr()
    assert cap.out.count("\n") == 1 and cap.out.startswith("prepared 1 dataset(s) in"), cap.out
    assert "mine 24 images" in cap.out and cap.err == ""
    shown = _run([*args, "--data-dir", str(tmp_path / "tty")], 80, tmp_path)
    assert any(line.startswith("prepared mine: 24 images (covid 12, normal 12)") for line in shown)
    assert any("decoding images" in line and "24/24" in line for line in shown), shown
    quiet = _run([*args, "--data-dir", str(tmp_path / "q"), "--quiet"], 80, tmp_path)
    said = " ".join(line for line in quiet if line.strip())  # one message, wrapped at 80
    assert said.startswith("prepared 1 dataset(s) in") and said.count("prepared") == 1, said
    assert "decoding" not in said
