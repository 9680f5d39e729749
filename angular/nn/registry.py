"""The registry of head types (docs/design.md, Heads and backbones): each head class registers itself
once, with its ``params.yaml`` type name and its options, and everything else is derived from it:
:data:`angular.nn.heads.PRESETS` and :data:`angular.nn.adaptive.ADAPTIVE_HEADS`, the model file's
rebuild (:func:`angular.nn.adaptive.build_adaptive_head`), and the config's head models and its
JSON schema (angular/config/heads.py).

An option is a name, its default (the constructor's) and its rule: :class:`Number` (``number >=
0``, ``number in [0, 1]``), :class:`Integer` (``integer >= 1``), :class:`Flag` (``true or
false``), or a :class:`Group` of options (SphereFace's ``lam`` schedule). Every head also takes the
scale ``s`` (a number > 0), which is not listed. Core only: torch and numpy, no pydantic.

Adding a head: write its class (a :class:`~angular.nn.heads.MarginHead`, or an
:class:`~angular.nn.adaptive.AdaptiveMarginHead` for a per-row margin) under ``@register_head(...)``,
give it an entry in params.yaml, and tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = [
    "HEADS",
    "Flag",
    "Group",
    "HeadType",
    "Integer",
    "Number",
    "Option",
    "register_head",
]


@dataclasses.dataclass(frozen=True)
class Number:
    """A finite number (not a bool) in the range; ``None``: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer (not a bool) ``>= low``."""

    low: int | None = None


@dataclasses.dataclass(frozen=True)
class Flag:
    """true or false."""


@dataclasses.dataclass(frozen=True)
class Group:
    """A mapping of options of its own (its config model is ``title``, described by ``doc``)."""

    title: str
    doc: str
    options: tuple[Option, ...]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a head: ``name`` (its params.yaml key), its constructor ``default`` (None for
    a group: each of its options has its own) and its ``rule``."""

    name: str
    default: Any
    rule: Number | Integer | Flag | Group


@dataclasses.dataclass(frozen=True)
class HeadType:
    """A registered head: its params.yaml ``name``, its class, its options, the ``formula`` its
    config model states, that model's ``title``, and whether it is ``adaptive`` (a per-row margin
    rule: the model file stores its options and rebuilds it from them)."""

    name: str
    cls: type
    options: tuple[Option, ...]
    formula: str
    title: str
    adaptive: bool

    def margin(self, s: float, options: dict[str, Any]):
        """The head's :class:`~angular.nn.heads.MarginSpec` for scale ``s`` and ``options``."""
        return self.cls.margin_spec(s, options)


HEADS: dict[str, HeadType] = {}  # in registration order: the presets, then the adaptive heads


def register_head(
    name: str,
    *,
    options: tuple[Option, ...],
    formula: str,
    title: str | None = None,
    adaptive: bool = False,
) -> Callable[[type], type]:
    """Class decorator: register the head class as params.yaml type ``name`` (once; its config
    model is called ``title``, by default the class name + ``Head``)."""

    def register(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"head type {name!r} is registered twice")
        cls.type_name = name
        HEADS[name] = HeadType(
            name=name,
            cls=cls,
            options=tuple(options),
            formula=formula,
            title=title or f"{cls.__name__}Head",
            adaptive=adaptive,
        )
        return cls

    return register
