"""Search-space values are read as users type them (issue 13, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from automl_cxr.cli._common import parse_key_values
from automl_cxr.errors import ConfigError
from automl_cxr.study import load_space
from automl_cxr.study._space import yaml_load


def test_exponent_floats_in_space_files_are_numbers(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(
        "lr: {low: 1e-4, high: 1e-2, log: true}\n"
        "weight_decay: {low: 1E-6, high: 1e-2, log: true}\n"
        "frozen_fraction: {low: 0, high: 1}\n"
        "batch_size: {low: 8, high: 64}\n"
        "heads:\n  linear:\n    dropout: {low: 0, high: 1}\n"
    )
    space = load_space(f)
    lr = space.train["lr"]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 1e-2, True)
    assert space.train["weight_decay"].low == 1e-6
    # [0, 1] is a real interval for a fraction, not the integers {0, 1}.
    ff = space.frozen_fraction
    assert (ff.kind, ff.low, ff.high) == ("float", 0.0, 1.0)
    assert space.heads["linear"]["dropout"].kind == "float"
    assert space.train["batch_size"].kind == "int"


def test_enqueue_values_typed_like_space_files() -> None:
    space = load_space(None)
    given = parse_key_values(["lr=1e-3,frozen_fraction=1,weight_decay=5E-4"], option="--enqueue")
    fixed = space.check_params(given, ["mobilenetv2_100"])
    assert fixed == {"lr": 1e-3, "frozen_fraction": 1.0, "weight_decay": 5e-4}
    assert all(isinstance(v, float) for v in fixed.values())
    with pytest.raises(ConfigError, match=r"lr must lie in \[0.0001, 0.03\], but got '1e-1'"):
        space.check_params({"lr": "1e-1"})


def test_yaml_load_keeps_strings_and_ints() -> None:
    assert yaml_load("a: '1e-3'\nb: 12\nc: 1.5\nd: .5e-3\ne: true\nf: adamw") == {
        "a": "1e-3",
        "b": 12,
        "c": 1.5,
        "d": 5e-4,
        "e": True,
        "f": "adamw",
    }


def test_studies_folder_matches_the_shipped_spaces() -> None:
    """`studies/` is the user-facing copy of the spaces the package ships: never let them drift."""
    from importlib.resources import files

    from automl_cxr.study._space import BUILTIN_SPACES

    repo = Path(__file__).resolve().parent.parent
    for name in BUILTIN_SPACES:
        shipped = files("automl_cxr.study").joinpath("spaces", f"{name}.yaml").read_text()
        assert (repo / "studies" / f"{name}.yaml").read_text() == shipped, name


def test_installed_wheel_uses_the_same_spaces(tmp_path: Path) -> None:
    """Installed from a wheel (not editable), `--profile cpu` and the default space are the
    checkout's, not a bare SearchSpace() (issue 13, item 12)."""
    import json
    import subprocess
    import sys
    import sysconfig

    repo = Path(__file__).resolve().parent.parent
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(repo)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    wheel = next(wheels.glob("automl_cxr-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # The dependencies (torch, timm, optuna, ...) come from this venv, appended after the
    # fresh venv's own site-packages; the editable checkout's import hook is not loaded.
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import json, automl_cxr\n"
        "from automl_cxr.study import get_profile, load_space\n"
        "from automl_cxr.study import resolve_space\n"
        "print(json.dumps({'file': automl_cxr.__file__,\n"
        "  'cpu': resolve_space(None, get_profile('cpu')).to_dict(),\n"
        "  'default': load_space(None).to_dict()}))\n"
    )
    out = subprocess.run(
        [py, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site)), got["file"]  # really the installed copy
    from automl_cxr.study import get_profile, resolve_space

    assert got["cpu"] == resolve_space(None, get_profile("cpu")).to_dict()
    assert got["default"] == load_space(None).to_dict()
    assert got["cpu"]["frozen_fraction"]["low"] == 0.85  # studies/cpu.yaml, not the bare default
