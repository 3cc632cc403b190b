"""Search spaces from YAML: which backbone, frozen depth, head and training options to try.

Grammar of a parameter: a list is a categorical choice, a mapping `{low, high[, log][, step]}`
a numeric range (integer when both bounds are integers), a scalar a fixed value, and `null`
(or absence) the profile's default. Frozen depth is sampled as `frozen_fraction` in [0, 1] and
mapped onto each backbone's own number of stages (`round(fraction * num_stages)`), so the space
never produces an invalid depth whatever the backbone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from automl_cxr.errors import ConfigError

__all__ = ["BUILTIN_SPACES", "ParamSpec", "SearchSpace", "builtin_space", "load_space", "yaml_load"]


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, but `1e-4`, `3E5` and `.5e-3` are numbers (YAML 1.2 reads them
    so; PyYAML alone reads them as strings unless written `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML as the space files and `--enqueue` values are read (exponent floats are
    numbers)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_FLOAT_KEYS = frozenset(
    {
        "frozen_fraction",
        "lr",
        "weight_decay",
        "momentum",
        "augment",
        "label_smoothing",
        "dropout",
        "site_adversarial",
        "group_dro",
        "group_dro_adjust",
        "weight_average",
    }
)
"""Parameters that are real numbers whatever their bounds look like: `{low: 0, high: 1}` is
the float range [0, 1], not the integers {0, 1}."""

_TRAIN_KEYS = (
    "lr",
    "optimizer",
    "weight_decay",
    "momentum",
    "batch_size",
    "augment",
    "label_smoothing",
    "resolution",
    "epochs",
    "schedule",
    "warmup_epochs",
    "class_weighting",
    "cpu_amp",
    "roi",
    "intensity",
    "site_adversarial",
    "source_balance",
    "group_dro",
    "group_dro_adjust",
    "weight_average",
)
_TOP_KEYS = ("description", "backbones", "frozen_fraction", "heads", "gray_mode", *_TRAIN_KEYS)


@dataclass(frozen=True)
class ParamSpec:
    """One searchable parameter: `kind` is 'categorical', 'float', 'int' or 'fixed'."""

    name: str
    kind: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    value: Any = None

    def suggest(self, trial: Any) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            if len(self.choices) == 1:
                return self.choices[0]
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def to_dict(self) -> dict:
        if self.kind == "fixed":
            return {"value": self.value}
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        d = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_param(name: str, raw: Any) -> ParamSpec:
    """A ParamSpec from YAML, with errors that name the key."""
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"search space key {name!r}: an empty list has nothing to choose")
        if any(isinstance(v, (list, dict)) for v in raw):
            raise ConfigError(f"search space key {name!r}: choices must be scalars, got {raw}")
        return ParamSpec(name, "categorical", choices=tuple(raw))
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"low", "high", "log", "step"})
        if unknown:
            raise ConfigError(
                f"search space key {name!r}: unknown field(s) {unknown}; "
                "allowed: low, high, log, step"
            )
        if "low" not in raw or "high" not in raw:
            raise ConfigError(f"search space key {name!r}: a range needs both 'low' and 'high'")
        low, high = raw["low"], raw["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(
                f"search space key {name!r}: low and high must be numbers, got {low!r}, {high!r}"
            )
        if low > high:
            raise ConfigError(
                f"search space key {name!r}: low must not exceed high, but got low={low}, "
                f"high={high}"
            )
        log = bool(raw.get("log", False))
        if log and low <= 0:
            raise ConfigError(
                f"search space key {name!r}: a log range needs low > 0, but got low={low}"
            )
        step = raw.get("step")
        if step is not None and (log or step <= 0):
            raise ConfigError(
                f"search space key {name!r}: step must be positive and not used with log, "
                f"but got step={step}"
            )
        is_float = name.rsplit(".", 1)[-1] in _FLOAT_KEYS
        kind = "int" if _is_int(low) and _is_int(high) and not is_float else "float"
        if kind == "float":
            low, high = float(low), float(high)
        return ParamSpec(name, kind, low=low, high=high, log=log, step=step)
    return ParamSpec(name, "fixed", value=raw)


@dataclass
class SearchSpace:
    """Backbones × frozen fraction × heads (with their conditional parameters) × training."""

    description: str = ""
    backbones: tuple[str, ...] | None = None
    frozen_fraction: ParamSpec = field(
        default_factory=lambda: ParamSpec("frozen_fraction", "float", low=0.0, high=1.0)
    )
    heads: dict[str, dict[str, ParamSpec]] = field(default_factory=lambda: {"linear": {}})
    gray_mode: ParamSpec = field(
        default_factory=lambda: ParamSpec("gray_mode", "fixed", value="replicate")
    )
    train: dict[str, ParamSpec] = field(default_factory=dict)
    source: str = "<default>"

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "<dict>") -> SearchSpace:
        if not isinstance(raw, dict):
            raise ConfigError(f"search space {source} must be a mapping of keys, got {type(raw)}")
        unknown = sorted(set(raw) - set(_TOP_KEYS))
        if unknown:
            raise ConfigError(
                f"search space {source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}"
            )
        space = cls(source=source, description=str(raw.get("description") or ""))
        if raw.get("backbones") is not None:
            bb = raw["backbones"]
            if not isinstance(bb, list) or not bb or not all(isinstance(b, str) for b in bb):
                raise ConfigError(
                    f"search space {source}: 'backbones' must be a non-empty list of timm names"
                )
            from automl_cxr.models import get_backbone

            for b in bb:
                get_backbone(b)  # unknown names fail here, with close matches
            space.backbones = tuple(bb)
        if raw.get("frozen_fraction") is not None:
            ff = parse_param("frozen_fraction", raw["frozen_fraction"])
            vals = (
                [ff.low, ff.high]
                if ff.kind in ("float", "int")
                else list(ff.choices)
                if ff.kind == "categorical"
                else [ff.value]
            )
            if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in vals):
                raise ConfigError(
                    f"search space {source}: 'frozen_fraction' must lie in [0, 1], got {vals}"
                )
            space.frozen_fraction = ff
        if raw.get("heads") is not None:
            space.heads = cls._parse_heads(raw["heads"], source)
        if raw.get("gray_mode") is not None:
            space.gray_mode = parse_param("gray_mode", raw["gray_mode"])
        for key in _TRAIN_KEYS:
            if raw.get(key) is not None:
                space.train[key] = parse_param(key, raw[key])
        return space

    @staticmethod
    def _parse_heads(raw: Any, source: str) -> dict[str, dict[str, ParamSpec]]:
        from automl_cxr.models import list_heads

        known = set(list_heads())
        if isinstance(raw, list):
            raw = {h: {} for h in raw}
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(
                f"search space {source}: 'heads' must map head names to their parameters"
            )
        out: dict[str, dict[str, ParamSpec]] = {}
        for head, params in raw.items():
            if head not in known:
                raise ConfigError(
                    f"search space {source}: unknown head {head!r} under 'heads'; "
                    f"allowed: {sorted(known)}"
                )
            params = params or {}
            if not isinstance(params, dict):
                raise ConfigError(f"search space {source}: heads.{head} must be a mapping")
            out[head] = {k: parse_param(f"{head}.{k}", v) for k, v in params.items()}
        return out

    def params(self, default_backbones: Sequence[str] | None = None) -> dict[str, ParamSpec]:
        """Every parameter a trial may suggest, by its Optuna name (head parameters are
        `<head>.<name>`); `backbone` chooses among the space's backbones, else (a space without
        its own list) `default_backbones`, the profile's."""
        out: dict[str, ParamSpec] = {}
        bb = tuple(self.backbones or default_backbones or ())
        if bb:
            out["backbone"] = ParamSpec("backbone", "categorical", choices=bb)
        out["frozen_fraction"] = self.frozen_fraction
        out["head"] = ParamSpec("head", "categorical", choices=tuple(self.heads))
        for ps in self.heads.values():
            out.update({p.name: p for p in ps.values()})
        out["gray_mode"] = self.gray_mode
        out.update({p.name: p for p in self.train.values()})
        return out

    def check_params(
        self, given: Mapping[str, Any], default_backbones: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Fixed values for some parameters (e.g. a configuration to run first), checked
        against the space and converted to each parameter's type; errors name the bad value
        and what is allowed."""
        specs = self.params(default_backbones)
        out: dict[str, Any] = {}
        for name, raw in given.items():
            if name not in specs:
                raise ConfigError(f"unknown parameter {name!r}; this space has {sorted(specs)}")
            p = specs[name]
            value = _coerce(raw, p)
            if p.kind == "categorical" and value not in p.choices:
                raise ConfigError(f"{name} must be one of {list(p.choices)}, but got {raw!r}")
            if p.kind in ("float", "int") and not (
                isinstance(value, (int, float)) and p.low <= value <= p.high
            ):
                raise ConfigError(f"{name} must lie in [{p.low}, {p.high}], but got {raw!r}")
            if p.kind == "fixed" and value != p.value:
                raise ConfigError(f"{name} is fixed at {p.value!r} here, but got {raw!r}")
            out[name] = value
        head = out.get("head")
        if head is not None:
            stray = [k for k in out if "." in k and k.split(".", 1)[0] != head]
            if stray:
                raise ConfigError(f"{stray} do not belong to head {head!r}")
        return out

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "description": self.description,
            "backbones": list(self.backbones) if self.backbones else None,
            "frozen_fraction": self.frozen_fraction.to_dict(),
            "heads": {h: {k: p.to_dict() for k, p in ps.items()} for h, ps in self.heads.items()},
            "gray_mode": self.gray_mode.to_dict(),
            "train": {k: p.to_dict() for k, p in self.train.items()},
        }


BUILTIN_SPACES = (
    "default",
    "cpu",
    "robust",
    "paper_three_class",
    "paper_four_class",
    "paper_binary",
)
"""Spaces shipped inside the package (`automl_cxr/study/spaces/*.yaml`); `studies/` in the
checkout holds the same files as user-facing copies to read and edit."""


def builtin_space(name: str) -> SearchSpace:
    """A space shipped with the package, by name (`default`, `cpu`, ...) or file name."""
    from importlib.resources import files

    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in BUILTIN_SPACES:
        raise ConfigError(
            f"unknown built-in search space {name!r}; allowed: {list(BUILTIN_SPACES)} "
            "or a path to a YAML file"
        )
    res = files("automl_cxr.study").joinpath("spaces", f"{stem}.yaml")
    return _parse_text(res.read_text(encoding="utf-8"), f"builtin:{stem}.yaml")


def load_space(path: str | Path | None) -> SearchSpace:
    """Load a YAML search space: a file, the name of a built-in space (`cpu`), or None for
    the documented default (`default.yaml`, shipped with the package)."""
    if path is None:
        return builtin_space("default")
    p = Path(path)
    if not p.is_file():
        # a built-in's name, as a string or as the Path the command line makes of it
        if str(path).removesuffix(".yaml") in BUILTIN_SPACES:
            return builtin_space(str(path))
        raise ConfigError(
            f"search space file not found: {p} (built-in spaces: {list(BUILTIN_SPACES)})"
        )
    return _parse_text(p.read_text(), str(p))


def _parse_text(text: str, source: str) -> SearchSpace:
    try:
        raw = yaml_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {source} is not valid YAML: {exc}") from None
    return SearchSpace.from_dict(raw, source=source)


def _coerce(raw: Any, p: ParamSpec) -> Any:
    """A command-line string typed as the space file types its values (YAML scalars: numbers,
    booleans, names); a whole number for a float range becomes a float."""
    if isinstance(raw, str):
        try:
            raw = yaml_load(raw)
        except yaml.YAMLError:
            return raw
    if p.kind == "float" and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    return raw
