"""Typed option schemas: plain dataclasses validated from YAML data.

Every handler declares its options as a frozen dataclass; the config loader
builds it with `build()` at start, so a typo fails `spoold check` rather than an
upload at 3 a.m. Supported field types: str, int, float, bool, `Seconds`,
`Bytes`, `Literal[...]`, `X | None`, `list[X]`, `dict[str, X]`, `Any` and nested
dataclasses. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

from spoold.errors import ConfigError

T = TypeVar("T")

YamlPath = tuple[str | int, ...]


class Seconds(float):
    """A duration in seconds; YAML may say `500ms`, `2s`, `5m`, `12h`, `7d` or a plain number."""


class Bytes(int):
    """A size in bytes; YAML may say `64MiB`, `5GiB`, `10GB` or a plain number."""


class Rate(int):
    """Bytes per second, more than zero; YAML may say `2MiB/s`, `500KB/s` (a size per second) or a plain number."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> Seconds:
    """Return `value` as seconds, or raise ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 5s, 10m or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return Seconds(value)
    match = _NUMBER_UNIT.match(str(value))
    if match is None or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"expected a duration like 500ms, 5s, 10m, 1h or 7d, got {value!r}")
    return Seconds(float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()])


def parse_size(value: object) -> Bytes:
    """Return `value` as bytes, or raise ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64MiB or 5GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return Bytes(value)
    match = _NUMBER_UNIT.match(str(value))
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 512KiB, 64MiB or 5GiB, got {value!r}")
    return Bytes(int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]))


def parse_rate(value: object) -> Rate:
    """Return `value` as bytes per second (a size with `/s`, or a whole number), or raise ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"a rate must be more than zero bytes per second, got {value!r}")
        return Rate(value)
    text = value.strip() if isinstance(value, str) else ""
    if not text.lower().endswith("/s"):
        raise ValueError(f"expected a rate like 512KiB/s, 2MiB/s or 10MB/s, got {value!r}")
    try:
        rate = parse_size(text[:-2])
    except ValueError:
        raise ValueError(f"expected a rate like 512KiB/s, 2MiB/s or 10MB/s, got {value!r}") from None
    if rate <= 0:
        raise ValueError(f"a rate must be more than zero bytes per second, got {value!r}")
    return Rate(rate)


def format_path(path: YamlPath) -> str:
    """Render a YAML path as `queues.episodes.chain[2].ship.to`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class Builder:
    """Builds typed values from YAML data, naming the YAML path and line of every error."""

    def __init__(self, lines: Mapping[YamlPath, int] | None = None, file: str = "") -> None:
        self.lines = lines or {}
        self.file = file

    def error(self, path: YamlPath, message: str) -> ConfigError:
        line = None
        for depth in range(len(path), -1, -1):
            line = self.lines.get(path[:depth])
            if line is not None:
                break
        return ConfigError(message, file=self.file, path=format_path(path), line=line)

    def build(self, cls: type[T], raw: object, path: YamlPath) -> T:
        """Return an instance of dataclass `cls` built from mapping `raw`."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(path, f"expected a mapping of options, got {_kind(raw)}")
        hints = typing.get_type_hints(cls)
        # A key that is a Python keyword (`import`, `from`) names its field in metadata {"key": ...}.
        fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if not isinstance(key, str) or key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(fields))}"
                raise self.error((*path, str(key)), f"unknown key {key!r}{hint}")
            values[fields[key].name] = self.convert(hints[fields[key].name], value, (*path, key))
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if required and field.name not in values:
                raise self.error(path, f"missing required key {name!r}")
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise self.error(path, str(exc)) from None

    def convert(self, hint: Any, value: object, path: YamlPath) -> Any:  # noqa: C901 - one branch per type
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is Any:
            return value
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            candidates = [a for a in args if a is not type(None)]
            errors: list[ConfigError] = []
            for candidate in candidates:
                try:
                    return self.convert(candidate, value, path)
                except ConfigError as exc:
                    errors.append(exc)
            raise errors[-1] if len(candidates) == 1 else self.error(path, f"unexpected value {value!r}")
        if origin is Literal:
            if value not in args:
                raise self.error(path, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
            return value
        if origin is list:
            if not isinstance(value, list):
                raise self.error(path, f"expected a list, got {_kind(value)}")
            return [self.convert(args[0], item, (*path, i)) for i, item in enumerate(value)]
        if origin is dict:
            if not isinstance(value, Mapping):
                raise self.error(path, f"expected a mapping, got {_kind(value)}")
            return {str(k): self.convert(args[1], v, (*path, str(k))) for k, v in value.items()}
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self.build(hint, value, path)
        parser = _SCALARS.get(hint)
        if parser is None:
            raise self.error(path, f"unsupported option type {hint!r}")
        try:
            return parser(value)
        except ValueError as exc:
            raise self.error(path, str(exc)) from None


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


def _parse_str(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return str(value)


def _parse_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


def _parse_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


_SCALARS: dict[Any, Callable[[object], Any]] = {
    str: _parse_str,
    int: _parse_int,
    float: _parse_float,
    bool: _parse_bool,
    Seconds: parse_duration,
    Bytes: parse_size,
    Rate: parse_rate,
}
