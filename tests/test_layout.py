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
        or m.endswith(
            ("._figures", "._fig_search", "._fig_models", "._figstyle", "._html", "._tables")
        )
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
            # ... nor a second name for one (`_f = finite_or_none`, `to_float = finite_or_nan`)
            helpers = {"clip01", "finite_or_nan", "finite_or_none", "fmt_num", "is_number"}
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Name)
                and node.value.id in helpers
            ):
                copies.append(f"{path.relative_to(PKG)}:{node.lineno} alias of {node.value.id}")
    assert not copies, copies


@pytest.mark.parametrize("package", ["models", "engine", "oof", "study"])
def test_other_packages_use_a_layers_public_names(package: str) -> None:
    """Issue 25: `deploy/_select.py` imported the private `study._testsplit`, the report
    `study._protocol`, the ensemble scorer re-implemented what `engine._metrics` holds; the
    packages import each other's public names only (the CLI may reach its own helpers)."""
    offenders = [
        f"{path.relative_to(PKG)} imports {m}"
        for path in PKG.rglob("*.py")
        if path.relative_to(PKG).parts[0] not in (package, "cli")
        for m in _imports(path)
        if m.startswith(f"automl_cxr.{package}._")
    ]
    assert not offenders, offenders


def test_study_and_diagnostics_use_the_data_layers_public_names() -> None:
    """Issue 25: `study/_setup.py` imported the private `data._diagnostics`; the layers above
    the data layer import its public names only (the CLI may reach its own helpers)."""
    offenders = []
    for sub in ("study", "diagnostics", "engine", "oof", "report", "deploy", "lungs"):
        for path in (PKG / sub).rglob("*.py"):
            if any(m.startswith("automl_cxr.data._") for m in _imports(path)):
                offenders.append(str(path.relative_to(PKG)))
    assert not offenders, offenders


# The layers in data-flow order (docs/ARCHITECTURE.md); a module may import only its own
# layer and the ones before it (issue 25). The root package (`automl_cxr/__init__.py`, the
# lazy facade) and `__main__` stand above all.
LAYERS = (
    "errors",
    "settings",
    "_numbers",
    "_lazy",
    "_progress",
    "_compat",
    "_storage",
    "data",
    "models",
    "lungs",
    "engine",
    "oof",
    "diagnostics",
    "study",
    "report",
    "deploy",
    "api",
    "cli",
)
# The one upward reference: calling the `automl_cxr.report` module (which shadows the API's
# `report` function once imported) forwards to `automl_cxr.api.report`.
_ALLOWED_UP = {("report/__init__.py", "automl_cxr.api")}


def _layer_of(path: Path, pkg: Path = PKG) -> str:
    return path.relative_to(pkg).parts[0].removesuffix(".py")


def _climbing(pkg: Path) -> list[str]:
    found = []
    for path in pkg.rglob("*.py"):
        layer = _layer_of(path, pkg)
        if layer in ("__init__", "__main__"):
            continue
        where = str(path.relative_to(pkg))
        for m in _imports(path):
            parts = m.split(".")
            if parts[0] != "automl_cxr" or len(parts) < 2 or parts[1] not in LAYERS:
                continue
            if LAYERS.index(parts[1]) > LAYERS.index(layer) and (where, m) not in _ALLOWED_UP:
                found.append(f"{where} ({layer}) imports {m}")
    return sorted(found)


def test_every_module_belongs_to_a_layer() -> None:
    names = {_layer_of(p) for p in PKG.rglob("*.py")} - {"__init__", "__main__"}
    assert names <= set(LAYERS), names - set(LAYERS)


def test_imports_never_climb() -> None:
    """A lower layer never imports a higher one, even inside a function: `study/_external.py`
    read external sets through `deploy._evaluate`, `oof/_calibration.py` owned the patient
    bootstrap the engine also wrote, `engine/_splits.py` its own `site_groups`."""
    assert not _climbing(PKG), _climbing(PKG)


def test_the_climb_check_finds_a_climb(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.py").write_text("def f():\n    from automl_cxr.study import x\n")
    assert _climbing(tmp_path) == ["data/m.py (data) imports automl_cxr.study"]


_OPTUNA_PRIVATE = {"_storage", "_study_id", "_trial_id", "_backend", "_file_path"}
_LIBRARIES = ("optuna", "optuna_dashboard", "timm", "ray", "torch", "torchvision")
# Private by contract though not by name: Tune's developer-API trial attribute, the system
# attribute `enqueue_trial` writes, optuna-dashboard's artifact keys.
_PRIVATE_BY_CONTRACT = {"pickled_error_file"}
_PRIVATE_KEYS = ("fixed_params", "dashboard:artifacts:")


def _own_private_attributes() -> set[str]:
    """Private attribute names automl-cxr itself sets (`self._x = ...`) or defines."""
    own: set[str] = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    own.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
    return own - _OPTUNA_PRIVATE


def test_library_private_apis_only_in_compat() -> None:
    """Issue 25: the private APIs of Optuna, optuna-dashboard, timm, Ray and torch are used in
    `automl_cxr/_compat/` only, one module per library, each helper naming what it reaches
    into. Before, Optuna's were read by the dashboard publisher, the OOF store and the report;
    `models/_freeze.py` imported `timm.models._manipulate`, `models/_weights.py` took
    `checkpoint_filter_fn` out of `sys.modules` and copied `nn.Module._parameters`,
    `engine/_trial.py` called `torch.ops.mkldnn._is_mkldnn_bf16_supported`,
    `study/_ray_scheduler.py` read `Trial.pickled_error_file`, `study/_setup.py` the
    `fixed_params` system attribute."""
    own = _own_private_attributes()
    offenders = []
    for path in PKG.rglob("*.py"):
        if "_compat" in path.relative_to(PKG).parts:
            continue
        where = str(path.relative_to(PKG))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.append(node.module)
                    names += [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[0] in _LIBRARIES and any(
                        p.startswith("_") and not p.startswith("__") for p in parts[1:]
                    ):
                        offenders.append(f"{where}:{node.lineno} imports {name}")
            elif isinstance(node, ast.Attribute):
                base = node.value.id if isinstance(node.value, ast.Name) else None
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                if (
                    node.attr in _OPTUNA_PRIVATE
                    or node.attr in _PRIVATE_BY_CONTRACT
                    or (private and base not in ("self", "cls") and node.attr not in own)
                ):
                    offenders.append(f"{where}:{node.lineno} .{node.attr}")
            elif (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and (node.value in _OPTUNA_PRIVATE or node.value.startswith(_PRIVATE_KEYS))
            ):
                offenders.append(f"{where}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_the_private_api_check_finds_what_it_names(tmp_path: Path, monkeypatch) -> None:
    """The check above fails on each kind of use it names (a check that cannot fail proves
    nothing): a private import, a library's private attribute, a private key."""
    import sys

    layout = sys.modules[__name__]

    for source in (
        "from timm.models._manipulate import group_with_matcher\n",
        "import torch\nx = torch.ops.mkldnn._is_mkldnn_bf16_supported()\n",
        "def f(trial):\n    return trial.pickled_error_file\n",
        "def f(t):\n    return t.system_attrs['fixed_params']\n",
        "def f(study):\n    return study._storage\n",
    ):
        pkg = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        pkg.mkdir()
        (pkg / "m.py").write_text(source)
        monkeypatch.setattr(layout, "PKG", pkg)
        with pytest.raises(AssertionError):
            layout.test_library_private_apis_only_in_compat()


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


MAX_LINES = 450


def test_no_module_over_450_lines() -> None:
    """Issue 25: a module that grows past ~450 lines holds two jobs (engine/_trial.py had
    1,035: the training session, the CV orchestration and the latency probe)."""
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_architecture_doc_names_every_layer_and_only_modules_that_exist() -> None:
    """docs/ARCHITECTURE.md matches the code: every layer of `LAYERS` has a row, and every
    module a row names (`_name` in backticks) exists in that row's package."""
    import re

    doc = (PKG.parent / "docs" / "ARCHITECTURE.md").read_text()
    rows = [r for r in doc.splitlines() if r.startswith("| ") and not r.startswith("| Layer")]
    named = " ".join(r.split("|")[2] for r in rows)
    missing_layers = [
        layer for layer in LAYERS if f"`{layer}`" not in named and f"`{layer}/`" not in named
    ]
    assert not missing_layers, missing_layers
    stale = []
    for row in rows:
        cells = row.split("|")
        pkg = re.fullmatch(r"\s*`(\w+)/`\s*", cells[2])
        if not pkg:
            continue
        for name in re.findall(r"`(_\w+)/?`", cells[3]):
            base = PKG / pkg.group(1) / name
            if not (base.with_suffix(".py").exists() or base.is_dir()):
                stale.append(f"{pkg.group(1)}/{name}")
    assert not stale, stale
