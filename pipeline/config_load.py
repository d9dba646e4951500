"""Reading a pipeline config: YAML files with ``_base_`` includes, ``key.sub=value`` overrides, typed building.

A config file may start from another one: a top-level ``_base_: other.yaml`` (relative to the including file;
bases may have bases) is read first and the including file is deep-merged over it (mappings merge key by key, any
other value of the overlay replaces the base's). Overrides are applied after the merge. Every problem becomes one
line of a :class:`ConfigError` starting with the dotted key it concerns (or the file, and line for bad YAML).

:func:`build` turns a plain dict into the typed dataclasses of :mod:`pipeline.config_schema`: ints widen to floats,
nothing else converts; field metadata ``choices`` and ``min`` are checked here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """An invalid configuration. ``errors`` holds one message per problem, each starting with a dotted key."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as every config author expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


# ------------------------------------------------------------------------------------------------ files
def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> Any:
    """The plain data of a config file, its ``_base_`` chain resolved and merged (the including file wins).

    Args:
        path: the YAML file.

    Returns:
        The merged mapping (``{}`` for an empty file), or whatever non-mapping the top file holds (the caller
        reports it).

    Raises:
        ConfigError: the file (or a base) cannot be read or parsed, a ``_base_`` is not a path, or the bases form
            a cycle; the line names the files involved.
    """
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, here))
        raise ConfigError([f"{path}: {BASE_KEY} cycle: {cycle}"])
    raw = _parse(path, included_by=_chain[-1] if _chain else None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        if _chain:
            raise ConfigError([f"{path}: expected a mapping at the top level, got {show(raw)} "
                               f"(the {BASE_KEY} of {_chain[-1]})"])
        return raw
    if BASE_KEY not in raw:
        return raw
    base = raw.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError([f"{path}: {BASE_KEY}: expected a file path relative to this file, got {show(base)}"])
    parent = read_config_file(path.parent / base, (*_chain, here))
    return deep_merge(parent, raw)


def _parse(path: Path, included_by: Path | None) -> Any:
    """The YAML of one file, without resolving its base."""
    whose = f" (the {BASE_KEY} of {included_by})" if included_by else ""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror or exc}){whose}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read config file (not UTF-8 text: {exc}){whose}"]) from exc
    try:
        return yaml.load(text, _Loader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: malformed YAML: {problem}{whose}"]) from exc


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``: mappings on both sides merge recursively, any other overlay value replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def copy_tree(raw: Any) -> Any:
    """A copy of nested mappings (leaves shared)."""
    return {k: copy_tree(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


# -------------------------------------------------------------------------------------------- overrides
def apply_override(raw: dict[str, Any], item: str, errors: list[str]) -> None:
    """Set ``key.sub=value`` (value parsed as YAML) in ``raw``, or record why not in ``errors``."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        errors.append(f"{key or item}: an override must look like key.sub=value, got {item!r}")
        return
    try:
        value = yaml.load(text, _Loader)  # a SafeLoader subclass
    except yaml.YAMLError:
        errors.append(f"{key}: cannot parse override value {text!r} as YAML")
        return
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            errors.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
            return
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------- typed building
def build(cls: type, raw: Any, prefix: str, errors: list[str], bad: set[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, recording every problem under its dotted key.

    A field that fails keeps its default and its dotted key goes into ``bad`` (so cross-field checks skip it).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{prefix}: expected a mapping, got {show(raw)}")
        bad.add(prefix)
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {join(prefix, close[0])}?)" if close else f" (known: {', '.join(fields)})"
            errors.append(f"{join(prefix, str(key))}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        dotted, tp = join(prefix, name), hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name], dotted, errors, bad)
            continue
        try:
            value = _coerce(raw[name], tp, dotted)
            _check_meta(value, f.metadata, dotted)
        except _FieldError as exc:
            errors.append(str(exc))
            bad.add(dotted)
            continue
        kwargs[name] = value
    return cls(**kwargs)


class _FieldError(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (ints widen to floats; nothing else converts), else raise :class:`_FieldError`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except _FieldError:
            raise _FieldError(f"{key}: expected {_type_name(tp)}, got {show(value)}") from None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, list):
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise _FieldError(f"{key}: expected {_type_name(tp)}, got {show(value)}")


def _check_meta(value: Any, meta: Any, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _FieldError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    low = meta.get("min")
    if low is not None and value < low:
        raise _FieldError(f"{key}: must be >= {low}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def show(value: Any) -> str:
    """A value as error messages show it: ``null``, or its type and repr (``str 'three'``)."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def join(prefix: str, name: str) -> str:
    """``prefix.name`` (just ``name`` at the top level)."""
    return f"{prefix}.{name}" if prefix else name
