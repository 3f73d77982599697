"""`when:` beside a step: the conditions under which it runs; otherwise the step is recorded as `skipped`.

Every condition is checked at the moment the step would start, on what the item is then: the payload as
earlier steps left it (a bundle step's archive, an encode step's videos), never the files beside it
(manifest, checksum files), and the item's name, kind and fields. The reason a step is skipped names the
first condition that failed, in the order the fields below are declared.

`fields` compares JSON values strictly: a string equals only a string, a boolean only a boolean, and numbers
equal by value (`5` equals `5.0`). A field captured by a queue's `fields.pattern` is always a string, so
`fields: {episode_index: '5'}` matches it and `fields: {episode_index: 5}` does not; the reason says so.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from spoold.options import Builder, Bytes, YamlPath

Kind = Literal["file", "bundle", "request"]
KINDS: tuple[str, ...] = get_args(Kind)
SCALARS = (str, int, float, bool, type(None))


@dataclasses.dataclass(frozen=True)
class When:
    size_below: Bytes | None = None
    size_at_least: Bytes | None = None
    name: str | None = None
    kind: list[Kind] | None = None
    fields: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        below, at_least = self.size_below, self.size_at_least
        if below is not None and at_least is not None and at_least >= below:
            raise ValueError(f"size_at_least {size_text(at_least)} and size_below {size_text(below)} can never "
                             "both hold, so the step would never run")  # fmt: skip
        if self.kind is not None and not self.kind:
            raise ValueError("kind lists no kinds, so the step would never run")


def build_when(builder: Builder, raw: object, path: YamlPath) -> When:
    """The `when:` mapping at `path`; an empty one, an unknown condition or a bad value is a ConfigError."""
    if not isinstance(raw, Mapping):
        raise builder.error(path, "when takes a mapping of conditions: size_below, size_at_least, name, kind, fields")
    if not raw:
        raise builder.error(path, "when: {} has no conditions; name at least one (size_below, size_at_least, name, "
                            "kind, fields) or remove it")  # fmt: skip
    kind = raw.get("kind")
    if isinstance(kind, str):
        # One kind may be written without a list; checked here so the error names the value, not a union.
        builder.convert(Kind, kind, (*path, "kind"))
        raw = {**raw, "kind": [kind]}
    fields = raw.get("fields")
    if isinstance(fields, Mapping):
        if not fields:
            raise builder.error((*path, "fields"), "fields: {} has no fields to compare")
        for key, value in fields.items():
            if not isinstance(value, SCALARS):
                raise builder.error((*path, "fields", str(key)), f"field {key!r} must equal a string, number, "
                                    f"boolean or null, not {type(value).__name__}")  # fmt: skip
    return builder.build(When, raw, path)


def unmet(when: When, *, payload: list[Path], name: str, kind: str, fields: Mapping[str, Any]) -> str | None:
    """The first condition of `when` that does not hold, as a reason to show; None when the step should run."""
    if when.size_below is not None or when.size_at_least is not None:
        size = payload_bytes(payload)
        if when.size_below is not None and size >= when.size_below:
            return f"size_below {size_text(when.size_below)}: the payload is {measured_text(size)}"
        if when.size_at_least is not None and size < when.size_at_least:
            return f"size_at_least {size_text(when.size_at_least)}: the payload is {measured_text(size)}"
    if when.name is not None and not fnmatch.fnmatchcase(name, when.name):
        return f"name {when.name!r}: the item is named {name!r}"
    if when.kind is not None and kind not in when.kind:
        return f"kind {', '.join(when.kind)}: the item is a {kind}"
    for key, expected in (when.fields or {}).items():
        if key not in fields:
            return f"fields.{key} == {_json_text(expected)}: the item has no field {key!r}"
        if not same_json(fields[key], expected):
            return f"fields.{key} == {_json_text(expected)}: the item has {_json_text(fields[key])}"
    return None


def unmet_in(when: When, document: Mapping[str, Any], item_dir: Path) -> str | None:
    """`unmet` for the item a sidecar document describes, whose folder is `item_dir`."""
    return unmet(when, payload=[item_dir / p for p in document["payload"]], name=str(document["item"]),
                 kind=str(document["kind"]), fields=document["fields"])  # fmt: skip


def same_json(a: object, b: object) -> bool:
    """Equal as JSON values: Python's `True == 1` and `'5' != 5` pitfalls both avoided."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def payload_bytes(paths: list[Path]) -> int:
    """Bytes of the regular files in `paths` and below them; symlinks and other special files count nothing.

    A payload path that is missing counts nothing either: the step that needs it reports that clearly.
    """
    total = 0
    folders: list[str] = []
    for path in paths:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
        elif stat.S_ISDIR(info.st_mode):
            folders.append(str(path))
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


_BINARY_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_DECIMAL_UNITS = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000))


def size_text(n: int) -> str:
    """A configured size as it was most likely written: `100MiB`, `100MB`, else bytes."""
    for unit, factor in (*_BINARY_UNITS, *_DECIMAL_UNITS):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"


def measured_text(n: int) -> str:
    """A measured size, readable and exact: `250.0 MiB (262144000 bytes)`."""
    for unit, factor in _BINARY_UNITS:
        if n >= factor:
            return f"{n / factor:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _json_text(value: object) -> str:
    if value is None:
        return "null"
    kind = {str: "a string", bool: "a boolean", list: "a list", dict: "a mapping"}.get(type(value), "a number")
    return f"{json.dumps(value, ensure_ascii=False, default=str)} ({kind})"
