"""Run configuration: one flat, typed dataclass per experiment, composed of the options its
parts own, overridden by ``--set key=value``.

    diralign config fig1          # every key: section, type, default, meaning

Who owns what: :mod:`diralign.runtime` (seed, dtype, device, threads, distributed; the loss
and chunking), :mod:`diralign.dynamics` (which dynamics, and each one's own options),
:mod:`diralign.trainer` (goals; log points and checkpoints).  Experiments subclass
:class:`TrainConfig` and add their own fields (their section is the experiment's).  Every
value is validated once, when the config is made (``__post_init__``), by the part that
reads it; unknown keys are errors with a did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .dynamics import OPTIONS as DYNAMICS_OPTIONS
from .errors import UserError
from .options import help_of, section_of, validate_all
from .runtime import ProblemOptions, RuntimeOptions
from .trainer import GoalOptions, LoggingOptions


@dataclass
class TrainConfig(LoggingOptions, GoalOptions, *reversed(DYNAMICS_OPTIONS), ProblemOptions, RuntimeOptions):
    """The settings every experiment shares (key order: runtime, problem, dynamics, goals, logging)."""

    def __post_init__(self):
        validate_all(self)


SECTION_ORDER = ("runtime", "problem", "dynamics", "goals", "logging")


def field_names(config_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or none"
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'str'}"
    return getattr(annotation, "__name__", str(annotation))


def _convert(raw: str, annotation: Any, key: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(raw, inner, key)
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in raw.replace("x", ",").split(",") if p.strip()] if raw else []
        return tuple(_convert(p.strip(), inner, key) for p in parts)
    try:
        if annotation is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int:
            value = float(raw)
            if not value.is_integer():
                raise ValueError(raw)
            return int(value)
        if annotation is float:
            value = float(raw)
            if math.isnan(value):
                raise ValueError(raw)
            return value
    except (ValueError, OverflowError):
        raise UserError(f"--set {key}={raw}: expected {_type_name(annotation)}") from None
    return raw


def unknown_key_error(key: str, valid, what: str = "config key") -> UserError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "diralign config EXPERIMENT lists them"
    return UserError(f"unknown {what} {key!r}; {hint}")


def parse_overrides(config_cls, pairs: list[str]) -> dict:
    """``["key=value", ...]`` to typed ``{key: value}`` (types checked, unknown keys refused)."""
    hints = typing.get_type_hints(config_cls)
    valid = field_names(config_cls)
    changes = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in valid:
            raise unknown_key_error(key, valid)
        changes[key] = _convert(raw.strip(), hints[key], key)
    return changes


def apply_overrides(config, pairs: list[str]):
    """A copy of ``config`` with ``key=value`` overrides applied, types checked, validated."""
    return dataclasses.replace(config, **parse_overrides(type(config), pairs))


def typed_value(config_cls, key: str, value):
    """A Python keyword value for ``key``, checked like ``--set`` (strings are parsed)."""
    hints = typing.get_type_hints(config_cls)
    if key not in hints:
        raise unknown_key_error(key, field_names(config_cls), "training option")
    annotation = hints[key]
    if isinstance(value, str) and annotation is not str:
        return _convert(value, annotation, key)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_to_dict(config) -> dict:
    return {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(config).items()}


def config_from_dict(config_cls, data: dict):
    if not isinstance(data, dict):
        raise UserError(
            f"config.json's 'config' entry is a {type(data).__name__}, not an object; the run directory is damaged"
        )
    hints = typing.get_type_hints(config_cls)
    valid = set(field_names(config_cls))
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise UserError(
                f"config.json has unknown key {key!r} for this experiment (written by another diralign version?)"
            )
        origin = typing.get_origin(hints[key])
        if origin in (tuple, list) and value is not None:
            if not isinstance(value, list):
                raise UserError(f"config.json: {key} must be a list, got {value!r}; the run directory is damaged")
            value = tuple(value)
        kwargs[key] = value
    # Types first: validation compares and computes with the values, and a string where a
    # number belongs would be a TypeError there instead of a line naming the key.
    _check_types(kwargs, hints)
    try:
        config = config_cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"config.json does not fit this experiment ({exc}); the run directory is damaged") from None
    return config


def _check_types(values: dict, hints) -> None:
    """Values read back from JSON must have the declared types (a hand-edited file may not)."""
    for name, value in values.items():
        annotation = hints[name]
        allowed: tuple = ()
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            if value is None:
                continue
            annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
            origin = typing.get_origin(annotation)
        if origin in (tuple, list):
            allowed = (tuple,)
            inner = (typing.get_args(annotation) or (str,))[0]
            if isinstance(value, tuple) and inner in (int, float, str):
                ok = (float, int) if inner is float else (inner,)
                bad = [v for v in value if not isinstance(v, ok) or isinstance(v, bool)]
                if bad:
                    raise UserError(
                        f"config.json: {name} holds {bad[0]!r}, not a {_type_name(inner)}; the run directory is damaged"
                    )
        elif annotation is float:
            allowed = (float, int)
        elif annotation in (int, str, bool):
            allowed = (annotation,)
        if allowed and (not isinstance(value, allowed) or (annotation in (int, float) and isinstance(value, bool))):
            raise UserError(
                f"config.json: {name} = {value!r} is not a {_type_name(hints[name])}; the run directory is damaged"
            )


def describe(config_cls, experiment: str) -> list[dict]:
    """Every key of ``config_cls``: section, name, type, default, meaning (``diralign config``)."""
    hints = typing.get_type_hints(config_cls)
    defaults = dataclasses.asdict(config_cls())
    rows = []
    for f in dataclasses.fields(config_cls):
        rows.append(
            {
                "section": section_of(config_cls, f.name, default=experiment),
                "key": f.name,
                "type": _type_name(hints[f.name]),
                "default": defaults[f.name],
                "help": help_of(config_cls, f.name),
            }
        )

    def order(row):
        base = row["section"].split(":")[0]
        return (SECTION_ORDER.index(base) if base in SECTION_ORDER else len(SECTION_ORDER), row["section"])

    return sorted(rows, key=order)


def format_description(rows: list[dict]) -> str:
    lines, section = [], None
    width = max(len(r["key"]) for r in rows)
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            lines.append(f"{'' if not lines else chr(10)}[{section}]")
        default = row["default"]
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        lines.append(f"  {row['key']:<{width}}  {row['type']:<14} = {shown!s:<12}  {row['help']}")
    return "\n".join(lines)


__all__ = ["TrainConfig", "apply_overrides", "config_from_dict", "config_to_dict", "describe", "parse_overrides"]
