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


class FileText(str):
    """A string read from a TOML file. TOML types its values, so a quoted number there is a mistake to report,
    while the same text on the command line (where every value is text) is parsed."""


# Names other trainers use for a key, so that a habit gets a suggestion as a typo does.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "iters": "steps",
           "max_iters": "steps", "micro_batch_size": "batch_size", "block_size": "seq_len",
           "context_length": "seq_len", "gradient_accumulation_steps": "grad_accum", "warmup_steps": "warmup",
           "n_layer": "n_layers", "n_head": "n_heads", "n_embd": "d_model", "dim": "d_model"}


def _from_file(key: str, value: Any, expected: str) -> None:
    if isinstance(value, FileText):
        raise ConfigError(f"{key}: expected {expected}, got the string {str(value)!r}; in TOML write it without "
                          "quotes")


def suggest(key: str, names: list[str]) -> str:
    """`` (did you mean X?)`` for a mistyped or borrowed key name, or nothing."""
    import difflib

    close = [ALIASES[key]] if ALIASES.get(key) in names else []
    close += difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    close += [n for n in names if n[:3] == key[:3]]
    close = list(dict.fromkeys(close))[:3]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _int(key: str, value: Any) -> int:
    _from_file(key, value, "an integer")
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
    _from_file(key, value, "a number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _bool(key: str, value: Any) -> bool:
    _from_file(key, value, "true or false")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _str(key: str, value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str.__str__(value) if isinstance(value, str) else str(value)
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
            shown = str.__str__(value) if isinstance(value, str) else value
            raise ConfigError(f"{key}: {shown!r} is not one of {', '.join(map(repr, allowed))}")
        return allowed[allowed.index(value)]  # the declared value itself, not a FileText
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and not isinstance(value, FileText)
                              and value.lower() in ("none", "null")):
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
        if isinstance(value, str) and not isinstance(value, FileText):
            value = parse_inline(key, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {coerce(f"{key}.{k}", kt, k): coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if origin in (list, tuple):
        et = get_args(tp)[0]
        if isinstance(value, str) and not isinstance(value, FileText):
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
            raise ConfigError(f"unknown config key {key!r}{suggest(k, list(types_))}")
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
        return _mark_text(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def _mark_text(value: Any) -> Any:
    """Every string of a parsed TOML document as FileText, so a quoted number is refused where it lands."""
    if isinstance(value, str):
        return FileText(value)
    if isinstance(value, dict):
        return {k: _mark_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_text(v) for v in value]
    return value


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
