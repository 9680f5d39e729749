"""Reading params.yaml as DVC does.

DVC parses params.yaml with ruamel.yaml (YAML 1.2); PyYAML's safe loader follows YAML 1.1, where
`1e-3` is a string, `yes`/`on` are booleans, `010` is eight and `1:20` is eighty, and a key given
twice silently keeps the last value (DVC refuses the file). The loader below reads scalars by the
YAML 1.2 rules and reports duplicate keys, so that the stages, `dvc params diff` and
`dvc exp run -S` all see the same values.
"""

import re
from pathlib import Path
from typing import Any

import yaml

from angular.config.params import Params, parse_params
from angular.config.rules import ConfigError

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NUMBER_START = list("-+0123456789")


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans, integers and floats."""

    def construct_yaml_int(self, node) -> int:
        value = self.construct_scalar(node).replace("_", "")
        sign = -1 if value.startswith("-") else 1
        value = value.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(value[:2].lower())
        return sign * (int(value[2:], base) if base else int(value, 10))


_ParamsLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ParamsLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ParamsLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*|0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    _NUMBER_START,
)
_ParamsLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    _NUMBER_START + ["."],
)
_ParamsLoader.add_constructor(_INT_TAG, _ParamsLoader.construct_yaml_int)


def _check_duplicate_keys(node, source: str, prefix: str = "") -> None:
    """A key given twice in one mapping is a :class:`ConfigError` naming it and both lines."""
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(
                    dotted, f"given twice (lines {lines[key]} and {line} of {source}); keep one"
                )
            lines[key] = line
            _check_duplicate_keys(value_node, source, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, source, f"{prefix}[{index}]")


def read_yaml(text: str, source: str | Path = "params.yaml") -> Any:
    """Parse YAML text as DVC does (YAML 1.2 scalars, no duplicate keys); ``source`` names the
    file in error messages."""
    loader = _ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, str(source))
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError("", f"{source}: not valid YAML: {error}") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; :class:`ConfigError` names the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "", f"{path}: no such file (run the stages from the project root)"
        ) from None
    except OSError as error:
        raise ConfigError("", f"{path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError("", f"{path}: not UTF-8 text ({error.reason})") from None
    raw = read_yaml(text, path)
    if raw is None:
        raise ConfigError("", f"{path} is empty")
    return parse_params(raw)
