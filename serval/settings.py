"""Settings read into dataclasses by pydantic: the training, model and server configs.

A dataclass opts in with `__pydantic_config__ = STRICT`: its values are checked against the fields'
types as JSON would carry them (an integer is not 2.0, "3" or true; a list is read as a tuple where
the field says so), an unknown name is an error, and every error names the setting and its source.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Mapping

from pydantic import ConfigDict, TypeAdapter, ValidationError

STRICT = ConfigDict(extra="forbid", strict=True)

T = typing.TypeVar("T")

# pydantic's error types, in the words a config's reader uses
_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dataclass_type": "expected a mapping of settings",
}


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's safe loader with YAML 1.2's numbers: `5e-5` is a float, not the string YAML 1.1 makes it."""
    import yaml  # only training configs are YAML: pyyaml is serval[train], not the base install

    class YamlLoader(yaml.SafeLoader):
        pass

    YamlLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return YamlLoader


def setting(default, help: str, **argument):
    """A dataclass field with a default and a help text (and `argument`: `parse`, `metavar`), for the
    command-line options made from a config's fields (`serval.serve.cli`)."""
    return dataclasses.field(default=default, metadata={"help": help, **argument})


def parse_yaml(text: str):
    """YAML text as plain values (numbers read as YAML 1.2 reads them)."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def read(cls: type[T], values: Mapping, source: str = "") -> T:
    """A `cls` (a dataclass; nested ones included) from plain values; ValueError naming the first
    wrong setting, prefixed with `source` (the file it came from) when one is given."""
    try:
        return _adapter(cls).validate_json(json.dumps(dict(values), default=str))
    except ValidationError as e:
        problem = describe(cls, e.errors()[0])
    except (TypeError, ValueError) as e:  # values JSON cannot carry (a circular reference, NaN keys)
        problem = f"cannot read the settings ({e})"
    raise ValueError(f"{source}: {problem}" if source else problem)


def describe(cls: type, error: Mapping) -> str:
    """One pydantic error as `name.of.setting: what is wrong, got VALUE`."""
    names, owner, hint, where = [], cls, cls, list(error["loc"])
    while (
        where and dataclasses.is_dataclass(owner) and where[0] in {f.name for f in dataclasses.fields(owner)}
    ):
        names.append(where.pop(0))
        hint = typing.get_type_hints(owner)[names[-1]]
        owner = _dataclass_of(hint)
    got = error["input"]
    if error["type"] == "unexpected_keyword_argument":
        fields = ", ".join(sorted(f.name for f in dataclasses.fields(owner)))
        return f"unknown setting {'.'.join([*names, str(where[0])])} (known: {fields})"
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and where and isinstance(where[0], str):
        return f"{'.'.join(names)}: {got!r} is none of {_type_name(hint)}"  # where[0] names the arm
    name = ".".join(names) + "".join(f"[{i!r}]" if isinstance(i, str) else f"[{i}]" for i in where)
    if error["type"] == "missing" and where:  # a tuple of fixed length, given too few
        return f"{'.'.join(names)}: too few values, got {got!r}"
    if error["type"] == "missing":
        return f"{name}: missing (it has no default)"
    expected = _EXPECTED.get(error["type"], error["msg"][0].lower() + error["msg"][1:])
    return f"{name}: {expected}, got {got!r}"


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "null")


def _dataclass_of(hint) -> type | None:
    """The dataclass a field's type names, if any (`SERConfig`, or `X | None`)."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
