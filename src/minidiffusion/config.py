"""Typed configs: dataclasses, named TOML presets, and `key=value` overrides from the command line.

A config is a dataclass whose fields may be nested dataclasses (`model.channels=[32,64]`).
Unknown keys are rejected with the list of valid ones; values are parsed as TOML literals
(`lr=3e-3`, `flip=false`, `channels=[32,64,128]`), falling back to plain strings.
The resolved config is written into every run directory as `config.toml`.

Allowed ranges are checked where a value enters, by `check_number` in each config's
`__post_init__` (and by the command line's argument types, which use the same function), so a
bad value is refused with one sentence naming the key, the value and the range. A key that an
older version had and this one removed (an experiment that lost) is listed in the dataclass's
`removed` ClassVar with its no-op value: saved configs holding that value still load, any
other value is refused with the commit where the option lived.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "apply_overrides", "load_preset", "list_presets", "dump_toml", "save_config",
           "check_number", "check_choice", "range_spec", "in_range"]

T = TypeVar("T")


def range_spec(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
               integer: bool = False) -> str:
    """Return the words for a range, e.g. "an integer in 1..1000", "a number in [0, 1)", "a number > 0"."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        if integer:
            return f"{kind} in {lo}..{hi}"
        return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi:g}"
    return kind if integer else "a finite number"


def in_range(value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False, integer: bool = False) -> bool:
    """Return True if `value` is a finite number (an int, not a bool, when `integer`) within the range."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    if not math.isfinite(value):
        return False
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    return not (hi is not None and (value >= hi if hi_open else value > hi))


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Any:
    """Return `value` if it is a finite number (an int when `integer`) within [lo, hi]; else raise ConfigError.

    `lo_open` / `hi_open` exclude the bound itself. The sentence names `name`, the value and the range,
    e.g. "steps must be an integer in 1..1000, got 0".
    """
    if not in_range(value, lo, hi, lo_open, hi_open, integer):
        raise ConfigError(f"{name} must be {range_spec(lo, hi, lo_open, hi_open, integer)}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices) -> Any:
    """Return `value` if it is one of `choices`; else raise ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def list_presets() -> list[str]:
    """Return the names of the shipped presets (files presets/NAME.toml)."""
    return sorted(p.name[:-5] for p in resources.files("minidiffusion.presets").iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    """Return the shipped preset `name` (or a path to a .toml file) as a plain dict."""
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist; give a preset name ({', '.join(list_presets())}) "
                              "or the path of a .toml file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the preset file {path} ({e}); give a readable TOML text file") from None
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
    """Return `cls(**d)` with nested dataclasses built recursively; unknown keys raise ConfigError.

    Keys in `cls.removed` (name -> the value that meant "off") are dropped when they hold that value
    and refused otherwise (see the module docstring). A top-level `recipe` key must equal the class's
    `recipe` ClassVar (presets and run configs name the recipe they are for) and is dropped.
    """
    types_ = _field_types(cls)
    d = _drop_recipe(cls, d) if not prefix else d
    d = _drop_removed(cls, d, prefix)
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
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _drop_recipe(cls, d: dict) -> dict:
    """A preset or run config names its recipe (`recipe = "..."`, a ClassVar of the config class): check and drop it."""
    if "recipe" not in d or not hasattr(cls, "recipe"):
        return d
    if d["recipe"] != cls.recipe:
        raise ConfigError(f"this config is for the {d['recipe']!r} recipe, not {cls.recipe!r}; train it with "
                          "`minidiffusion train` and its own preset")
    return {k: v for k, v in d.items() if k != "recipe"}


def _drop_removed(cls, d: dict, prefix: str) -> dict:
    removed = getattr(cls, "removed", {})
    out = {}
    for k, v in d.items():
        if k in removed:
            off, commit = removed[k]
            if v != off:
                raise ConfigError(f"config key {prefix + k!r} = {v!r} was an experiment that did not beat the "
                                  f"preset and has been removed; use the version at commit {commit} for it, or "
                                  f"set {prefix + k}={_toml_value(off)}")
            continue
        out[k] = v
    return out


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
    """Write the resolved dataclass config to `path` as TOML (atomically), with `recipe = "..."` first when
    the config class names its recipe; return the path."""
    from .paths import atomic_write

    path = Path(path)
    header = {"recipe": cfg.recipe} if isinstance(getattr(type(cfg), "recipe", None), str) else {}
    with atomic_write(path) as tmp:
        tmp.write_text(dump_toml({**header, **to_dict(cfg)}))
    return path
