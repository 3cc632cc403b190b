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
