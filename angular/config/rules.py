"""The field rules of params.yaml and the wording of their errors.

Each helper is the type pydantic checks (and writes into the JSON schema) plus the plain words of
its error, so that a message reads ``train.epochs: must be an integer >= 1, got 0`` rather than
pydantic's own. :class:`Section` is the base of every mapping of the file.
"""

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# pydantic puts the chosen union member's tag into an error's location: not a key
TAG = "type="
UNIQUE = Field(json_schema_extra={"uniqueItems": True})


class ConfigError(ValueError):
    """A bad ``params.yaml``: ``key`` is the dotted key, the message says what is wrong with it."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


def describe(value) -> str:
    """A value as an error message shows it: strings with their type, so ``'1'`` is not 1."""
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problem(text: str, *at: str | int) -> PydanticCustomError:
    """An error with our wording; ``at`` names the key below the one being validated, if any."""
    return PydanticCustomError("params", "{text}", {"text": text, "at": at})


def must(base: Any, requirement: str, *, optional: bool = False, show=describe) -> Any:
    """``base``, where any failure reads ``must be <requirement>, got <value>``."""
    if optional:
        base, requirement = base | None, f"{requirement} (or null)"

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise problem(f"must be {requirement}, got {show(value)}") from None

    return Annotated[base, WrapValidator(check)]


def integer(low: int | None = None, *, optional: bool = False) -> Any:
    """An int (not a bool, not 2.0)."""
    bound = "" if low is None else f" >= {low}"
    strict = Annotated[int, Field(strict=True, ge=low)]
    return must(strict, f"an integer{bound}", optional=optional)


def number(low=None, high=None, *, low_open=False, high_open=False, optional=False) -> Any:
    """A finite int or float (not a bool, not a string) in the range; stored as a float."""
    bounds = {"gt" if low_open else "ge": low, "lt" if high_open else "le": high}
    strict = Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]
    if low is not None and high is not None:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
    elif low is not None:
        words = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        words = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        words = "a finite number"
    return must(strict, words, optional=optional)


def flag() -> Any:
    """true or false (YAML 1.2: not yes/no/on/off, not 0/1)."""
    return must(Annotated[bool, Field(strict=True)], "true or false")


def text(*, optional: bool = False) -> Any:
    """A string with something besides blanks."""
    strict = Annotated[str, Field(strict=True, pattern=r"\S")]
    return must(strict, "a non-empty string", optional=optional, show=repr)


def choice(*options, requirement: str | None = None) -> Any:
    """One of ``options``, of the same type (``channels: true`` is not 1)."""
    requirement = requirement or f"one of {', '.join(map(str, options))}"

    def check(value, handler):
        if not any(type(value) is type(option) and value == option for option in options):
            raise problem(f"must be {requirement}, got {describe(value)}")
        return handler(value)

    return Annotated[Literal[options], WrapValidator(check)]


def unique(what: str) -> AfterValidator:
    """A list without repeats: ``lists <what> twice: [...]``."""

    def check(values):
        if len(set(values)) != len(values):
            raise problem(f"lists {what} twice: {list(values)}")
        return values

    return AfterValidator(check)


class Section(BaseModel):
    """A mapping of params.yaml: frozen, with only the keys its model declares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_known_keys(cls, value):
        # Checked before the fields (pydantic's extra="forbid" alone would not list the known keys).
        if not isinstance(value, Mapping):
            raise problem(f"must be a mapping, got {describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise problem(f"keys must be strings, got {key!r}")
            if key not in cls.model_fields:
                known = ", ".join(sorted(cls.model_fields))
                raise problem(f"unknown key (known keys here: {known})", key)
        return value


def _dotted(parts) -> str:
    key = ""
    for part in parts:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part != "[key]" and not part.startswith(TAG):
            key += f".{part}" if key else part
    return key


def config_error(error: ValidationError) -> ConfigError:
    """The first of pydantic's errors as a :class:`ConfigError` naming its dotted key."""
    first = error.errors(include_url=False)[0]
    parts = list(first["loc"])
    if first["type"] == "params":
        parts += first["ctx"]["at"]
        message = first["ctx"]["text"]
    elif first["type"] == "missing":
        message = "missing (every key of params.yaml is required)"
    else:  # a check without a helper's wording (should not happen)
        message = f"{first['msg']}, got {describe(first['input'])}"
    return ConfigError(_dotted(parts) or "params", message)
