"""Package layout rules: the report's data side never draws, and deploy modules import each
other in one direction only (no cycles, not even through function-level imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "automl_cxr"
REPORT_DATA_SIDE = ("_records", "_ranking", "_paper", "_plotdata", "_data")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("name", REPORT_DATA_SIDE)
def test_report_data_side_does_not_draw_or_render(name: str) -> None:
    mods = _imports(PKG / "report" / f"{name}.py")
    drawing = {
        m
        for m in mods
        if m.split(".")[0] in ("plotly", "matplotlib", "rich", "kaleido")
        or m.endswith(("._figures", "._html", "._tables"))
    }
    assert not drawing, f"report/{name}.py imports {sorted(drawing)}"


def _cycle(package: str) -> list[str] | None:
    files = {p.stem: p for p in (PKG / package).glob("_*.py")}
    prefix = f"automl_cxr.{package}."
    graph = {
        name: {m[len(prefix) :] for m in _imports(path) if m.startswith(prefix)} & set(files)
        for name, path in files.items()
    }

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node) :], node]
        for nxt in sorted(graph[node]):
            found = visit(nxt, [*stack, node])
            if found:
                return found
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


@pytest.mark.parametrize("package", ["deploy", "report"])
def test_no_import_cycles(package: str) -> None:
    assert _cycle(package) is None, f"import cycle in {package}: {' -> '.join(_cycle(package))}"


def test_license_is_an_spdx_expression_with_its_file() -> None:
    """setuptools deprecates the table form of `project.license` (builds stop working after
    2027-02-18): an SPDX string and the license file it ships."""
    import tomllib

    from packaging.licenses import canonicalize_license_expression

    repo = PKG.parent
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)
    assert canonicalize_license_expression(project["license"]) == project["license"]
    assert all((repo / f).is_file() for f in project["license-files"])


def test_numbers_are_read_by_one_set_of_rules() -> None:
    """Issue 25: the finite-float / clip helper lived six times; one module now, and no
    module defines its own `float(x)` + `isfinite` reader again."""
    from automl_cxr._numbers import clip01, finite_or_nan, finite_or_none, fmt_num

    assert finite_or_none("0.5") == 0.5 and finite_or_none(float("inf")) is None
    assert finite_or_none(None) is None and finite_or_none(True) is None
    assert finite_or_nan("x") != finite_or_nan("x")  # NaN
    assert clip01(1.2) == 1.0 and clip01(-0.1) == 0.0 and clip01("n/a") is None
    assert fmt_num(0.12345, ".2f") == "0.12" and fmt_num(None) == "-"
    copies = []
    for path in PKG.rglob("*.py"):
        if path.name == "_numbers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and len(node.body) <= 6:
                src = ast.unparse(node)
                if "float(x)" in src and ("isfinite" in src or "v != v" in src):
                    copies.append(f"{path.relative_to(PKG)}:{node.name}")
    assert not copies, copies


def test_study_and_diagnostics_use_the_data_layers_public_names() -> None:
    """Issue 25: `study/_setup.py` imported the private `data._diagnostics`; the layers above
    the data layer import its public names only (the CLI may reach its own helpers)."""
    offenders = []
    for sub in ("study", "diagnostics", "engine", "oof", "report", "deploy", "lungs"):
        for path in (PKG / sub).rglob("*.py"):
            if any(m.startswith("automl_cxr.data._") for m in _imports(path)):
                offenders.append(str(path.relative_to(PKG)))
    assert not offenders, offenders


# The layers in data-flow order; a layer may import only the ones before it (issue 25).
_LAYERS = ("data", "models", "engine", "oof", "lungs", "study", "report", "deploy")


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("data", "engine"),
        ("data", "study"),
        ("data", "deploy"),
        ("engine", "study"),
        ("engine", "oof"),
        ("engine", "deploy"),
        ("oof", "study"),
        ("oof", "deploy"),
        ("study", "deploy"),
    ],
)
def test_imports_never_climb(lower: str, upper: str) -> None:
    """A lower layer never imports a higher one, even inside a function: `study/_external.py`
    read external sets through `deploy._evaluate`, `oof/_calibration.py` owned the patient
    bootstrap the engine also wrote, `engine/_splits.py` its own `site_groups`."""
    climbing = sorted(
        f"{path.relative_to(PKG)} imports {m}"
        for path in (PKG / lower).rglob("*.py")
        for m in _imports(path)
        if m == f"automl_cxr.{upper}" or m.startswith(f"automl_cxr.{upper}.")
    )
    assert not climbing, climbing


_OPTUNA_PRIVATE = {"_storage", "_study_id", "_trial_id", "_backend", "_file_path"}


def test_optuna_private_attributes_only_in_compat() -> None:
    """Issue 25: Optuna's private attributes (a study's storage and id, a trial's id, a
    journal's file) are read in `automl_cxr/_compat.py` only, where each helper names what it
    reaches into; the dashboard publisher, the OOF store, the report and the storage helpers
    each read some of them directly."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in _OPTUNA_PRIVATE:
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} .{node.attr}")
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in _OPTUNA_PRIVATE
            ):
                offenders.append(
                    f"{path.relative_to(PKG)}:{node.lineno} getattr {node.args[1].value}"
                )
    assert not offenders, offenders


def test_manifest_columns_extend_the_source_columns_written_once() -> None:
    """Issue 25: the manifest's column list and the source tables' were two lists that had to
    agree; the manifest's is now derived (same order: hashes and caches depend on it)."""
    from automl_cxr.data._dataset import MANIFEST_COLUMNS
    from automl_cxr.data._sources import COLUMNS

    assert [c for c in MANIFEST_COLUMNS if c in COLUMNS] == COLUMNS
    assert [
        *("path", "label", "patient_id", "group_id", "source", "view", "license", "sha256"),
        *("width", "height", "split", "finding", "age", "sex", "age_group", "site"),
    ] == MANIFEST_COLUMNS
