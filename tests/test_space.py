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
