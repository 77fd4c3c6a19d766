"""Typed config sections: the one way a config value is read, checked and changed.

A section is a dataclass deriving from `Section`. Constructing one checks every field against its type hint
(ints widen to floats, lists become tuples where the hint says so), then runs the section's own `check()`;
a problem raises `ConfigError` naming the field. A section that exists is therefore valid, however it was
made: from YAML (`build_section`), in code, or by `dataclasses.replace`. `with_values` changes nested
fields by dotted key with typed values (`{"optim.lr": 0.004}`), so errors still name the full key. Text
exists only at the edge: YAML files and `key=value` overrides on the command line (`apply_overrides`).

Numbers read as people write them: `3e-3`, `1e-05` and `.5` are floats in files and overrides alike (YAML
1.2; PyYAML's 1.1 rules read them as strings).

A leaf module: it imports nothing of ours but `errors`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mutransfer.errors import ConfigError

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's floats (a dot or an exponent; the exponent's sign optional), as well as .inf and .nan
YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class NumberLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads floats by YAML 1.2's rules (its int, bool and null rules are unchanged)."""


NumberLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
NumberLoader.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))  # after int: "3" stays an int


def load_yaml(text: str, where: str = "--config") -> Any:
    """YAML text to Python values with `NumberLoader`; a syntax error is a one-line ConfigError naming
    `where`, the line and the column."""
    try:
        return yaml.load(text, Loader=NumberLoader)  # NumberLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(where, f"not valid YAML{at}: {problem}") from None


def read_yaml_mapping(path: str | Path, where: str = "--config") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(where, f"no such file: {path}")
    raw = load_yaml(path.read_text(), f"{where} {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(where, f"{path} must hold a mapping of sections")
    return raw


@functools.cache
def check_path_text(key: str, path: str | None) -> None:
    """A path that will be written into scripts and logs must be one line: a newline (or NUL) in it would
    start a new command in a generated shell script."""
    if path is not None and any(c in path for c in "\n\r\0"):
        raise ConfigError(key, f"a path must not contain a newline or NUL, got {path!r}")


def check_at_least(key: str, value: float | None, minimum: float) -> None:
    """A section's bound on one value: None passes, NaN fails."""
    if value is not None and not value >= minimum:
        raise ConfigError(key, f"must be at least {minimum:g}, got {value}")


def check_in_unit_interval(key: str, value: float, closed: bool = False) -> None:
    """A value in [0, 1) (a momentum, a decay) or, with `closed`, in [0, 1] (a ratio)."""
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ConfigError(key, f"must lie in [0, 1{']' if closed else ')'}, got {value}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


class Section:
    """Base of every config section (see the module docstring). Subclasses are dataclasses and put their
    own cross-field checks in `check()`, raising ConfigError(field, message) with the field's own name."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            hint = hints[f.name]
            value = getattr(self, f.name)
            if _is_section_type(hint):
                if not isinstance(value, hint):
                    raise ConfigError(f.name, f"must be a {hint.__name__}, got {value!r}")
                continue
            object.__setattr__(self, f.name, coerce(f.name, value, hint))
        self.check()

    def check(self) -> None:
        """Cross-field checks of the section; the type of every field is already right."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(value: Any) -> Any:
    """Sections as nested dicts of plain values (tuples as lists), as YAML would hold them."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def _coerce_union(key: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(key, "must not be null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(key, value, arg)
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def _coerce_container(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(key, f"must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = args or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return [coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {value!r}")
    _, value_hint = args or (str, Any)
    return {str(k): str(v) if value_hint is str else v for k, v in value.items()}


SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against a type hint; lists become tuples and ints floats where the hint says."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(key, value, hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):  # True == 1
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (tuple, list, dict):
        return _coerce_container(key, value, hint)
    if hint not in SCALARS:
        return value
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(key, f"must be {SCALARS[hint]}, got {value!r}")
    return value


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def unknown_key(key: str, known: set[str] | dict[str, Any]) -> ConfigError:
    """The error for a key no section field has, listing the ones it does have."""
    return ConfigError(key, f"unknown key (known: {', '.join(sorted(known))})")


def build_section(cls: type, values: Any, prefix: str = "") -> Any:
    """A section from a mapping (a YAML section): unknown keys, wrong types and bad values raise ConfigError
    naming the dotted key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(prefix, f"must be a mapping of keys, got {values!r}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in known:
            raise unknown_key(join_key(prefix, key), known)
    kwargs = {name: build_section(hints[name], values.get(name), join_key(prefix, name))  # missing ones too
              for name in known if _is_section_type(hints[name])}
    kwargs.update((name, value) for name, value in values.items() if name not in kwargs)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.within(prefix) from None


def with_values(section: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """A copy of `section` with typed values at dotted keys (`{"optim.lr": 0.004, "model.depth": 16}`);
    every section on the way is checked again, and errors name the full key."""
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    known = {f.name: f for f in dataclasses.fields(section) if f.init}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in known:
            raise unknown_key(join_key(prefix, key), known)
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    for head, inner in nested.items():
        own[head] = with_values(getattr(section, head), inner, join_key(prefix, head))
    try:
        return dataclasses.replace(section, **own)
    except ConfigError as err:
        raise err.within(prefix) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` from the command line: the dotted path and the value read as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, key) if raw.strip() else None
    except ConfigError as err:
        raise ConfigError(key, f"cannot parse value {raw!r}") from err
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Command-line overrides written into a mapping read from YAML, before it is built into sections."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), f"{part} is not a section")
        node[path[-1]] = value
    return raw
