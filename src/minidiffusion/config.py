"""Typed configs: dataclasses, named TOML presets, and `key=value` overrides from the command line.

A config is a dataclass whose fields may be nested dataclasses (`model.channels=[32,64]`).
Unknown keys are rejected with the list of valid ones; values are parsed as TOML literals
(`lr=3e-3`, `flip=false`, `channels=[32,64,128]`), falling back to plain strings.
The resolved config is written into every run directory as `config.toml`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "apply_overrides", "load_preset", "list_presets", "dump_toml", "save_config"]

T = TypeVar("T")


def list_presets() -> list[str]:
    """Return the names of the shipped presets (files presets/NAME.toml)."""
    return sorted(p.name[:-5] for p in resources.files("minidiffusion.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    """Return the shipped preset `name` (or a path to a .toml file) as a plain dict."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("minidiffusion.presets") / f"{name}.toml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name!r}; choose one of {list_presets()} or give a .toml path")
        text = res.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {name!r} is not valid TOML: {e}") from None


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_in(tp) -> type | None:
    """The dataclass type inside `tp` (itself, or X in `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert a TOML value to the field type `tp` (tuples from lists, floats from ints)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list like [1, 2], got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is not tp:
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], d: dict, prefix: str = "") -> T:
    """Return `cls(**d)` with nested dataclasses built recursively; unknown keys raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(d) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys: "
                          f"{', '.join(prefix + k for k in types_)}")
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_in(types_[k])
        if sub is not None and isinstance(v, dict):
            kwargs[k] = from_dict(sub, v, prefix=f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, types_[k], prefix + k)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config for {cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    """Return a dataclass config as a nested dict of plain values (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of `cfg` with each 'a.b=value' applied; bad keys or values raise ConfigError."""
    d = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. epochs=5)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a config section")
            node = node[p]
        node[parts[-1]] = _parse_value(text.strip())
    return from_dict(type(cfg), d)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(d: dict, _prefix: str = "") -> str:
    """Return a nested dict (no None values) as TOML text; sub-dicts become [tables]."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{_prefix}{k}]", dump_toml(v, f"{_prefix}{k}.")]
    return "\n".join(lines).strip() + "\n"


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved dataclass config to `path` as TOML; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(to_dict(cfg)))
    return path
