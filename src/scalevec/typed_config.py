"""Strict typed configs: nested dataclasses filled from TOML tables and ``a.b=value`` overrides.

Every key is checked against the dataclass field it targets; an unknown key, a value of the wrong type or a
value outside a ``Literal`` stops with a ``ConfigError`` whose one-line message names the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A config problem, with a message that names the offending key."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)  # accept 1e6
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _float(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _str(key: str, value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


_SCALARS = {int: _int, float: _float, bool: _bool, str: _str}


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(map(repr, get_args(tp)))
    return "true or false" if tp is bool else getattr(tp, "__name__", str(tp))


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from TOML or a command-line string) to ``tp`` or raise naming ``key``."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        if len(args) == 1:
            return coerce(key, args[0], value)
        for a in args:  # in declaration order: ``bool | Literal["auto"]`` reads "true" as a bool
            try:
                return coerce(key, a, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if origin is dict:
        kt, vt = get_args(tp)
        if isinstance(value, str):
            value = parse_inline(key, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {coerce(f"{key}.{k}", kt, k): coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if origin in (list, tuple):
        et = get_args(tp)[0]
        if isinstance(value, str):
            value = parse_inline(key, value) if value.strip().startswith("[") else [
                v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        out = [coerce(f"{key}[{i}]", et, v) for i, v in enumerate(value)]
        if origin is tuple and len(get_args(tp)) > 1 and get_args(tp)[1] is not Ellipsis \
                and len(out) != len(get_args(tp)):
            raise ConfigError(f"{key}: expected {len(get_args(tp))} values, got {len(out)}")
        return tuple(out) if origin is tuple else out
    if tp in _SCALARS:
        return _SCALARS[tp](key, value)
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def parse_inline(key: str, text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{key}: cannot parse {text!r} as a TOML value ({e})") from None


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def update(obj: Any, table: dict[str, Any], prefix: str = "") -> Any:
    """Apply a (possibly nested) table to dataclass ``obj`` in place, strictly."""
    types_ = field_types(type(obj))
    for k, v in table.items():
        key = f"{prefix}{k}"
        if k not in types_:
            close = [n for n in types_ if n[:3] == k[:3]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        tp = types_[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a table of {_type_name(tp)} fields, got {v!r}")
            sub = getattr(obj, k)
            hook = getattr(sub, "apply_table", None)
            if hook is not None:
                setattr(obj, k, hook(v, prefix=f"{key}."))
            else:
                update(sub, v, prefix=f"{key}.")
        else:
            setattr(obj, k, coerce(key, tp, v))
    return obj


def overrides_to_table(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` to a nested table of raw strings (typed later by ``update``)."""
    table: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        node = table
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier value for {p!r}")
        node[parts[-1]] = value.strip()
    return table


def merge_tables(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_tables(out[k], v)
        else:
            out[k] = v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def to_table(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-writable table (None values dropped, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_table(v)
        elif v is None:
            continue
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs of one dataclass type, as ``key: a -> b``."""
    out: list[str] = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out += differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(f"{prefix}{f.name}: {json.dumps(x, default=str)} -> {json.dumps(y, default=str)}")
    return out
