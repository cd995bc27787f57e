"""Typed option dataclasses: each part of diralign declares the settings it reads, with a
one-line meaning, and validates them in one place.

    python -c "from diralign.options import Options, option; help(option)"

A run's flat config (:class:`diralign.config.TrainConfig` and the experiments' subclasses)
is composed of these classes, so ``--set key=value`` stays flat while every key keeps an
owner: ``Owner.from_config(config)`` hands the owner exactly its own fields, typed, and the
key's *section* (runtime, dynamics, goals, logging, the experiment's own) is the
``SECTION`` of the class that first declares it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional

HELP = "help"


def option(default: Any, help: str) -> Any:  # noqa: A002 - the word users read
    """A dataclass field with its one-line meaning (what ``diralign config`` prints)."""
    return field(default=default, metadata={HELP: help})


def inherit(owner: type, name: str, default: Any) -> Any:
    """Redeclare ``owner``'s field ``name`` with another default, keeping its meaning."""
    meta = {f.name: f for f in dataclasses.fields(owner)}[name].metadata
    return field(default=default, metadata=dict(meta))


class Options:
    """Base of every options dataclass."""

    SECTION: Optional[str] = None  # None: the experiment's own settings

    def validate(self) -> None:
        """Raise :class:`~diralign.errors.UserError` for values this part cannot use."""

    @classmethod
    def from_config(cls, config) -> Options:
        """This class's own fields, taken from a composed config (which is validated already)."""
        values = dataclasses.asdict(config) if not isinstance(config, dict) else config
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def validate_all(config) -> None:
    """Run the ``validate`` of every options class a composed config is made of."""
    seen = set()
    for klass in type(config).__mro__:
        check = klass.__dict__.get("validate")
        if check is not None and check not in seen and klass is not Options:
            seen.add(check)
            check(config)


def section_of(config_cls: type, name: str, default: str = "experiment") -> str:
    """The section of key ``name``: the ``SECTION`` of the most basic class declaring it."""
    for klass in reversed(config_cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dict__.get("SECTION") or default
    return default


def help_of(config_cls: type, name: str) -> str:
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return str(f.metadata.get(HELP, ""))
    return ""
