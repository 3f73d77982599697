"""Names and fields of items: what an inbox entry's name and small JSON files say about the item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spoold.daemon.config import Queue
from spoold.fsio import UnsafeFile, read_small_file
from spoold.templates import shadowed_builtins

REQUEST_SUFFIXES = (".fetch.json", ".json")


def item_name_for(entry: str, kind: str) -> str:
    """A request drops its `.json` (and `.fetch`): `session1.fetch.json` is item `session1`."""
    if kind == "request":
        for suffix in REQUEST_SUFFIXES:
            if entry.endswith(suffix) and len(entry) > len(suffix):
                return entry[: -len(suffix)]
    return entry


def fields_from_name(queue: Queue, original_name: str) -> dict[str, Any]:
    if queue.fields_pattern is None:
        return {}
    match = queue.fields_pattern.search(original_name)
    return {k: v for k, v in match.groupdict().items() if v is not None} if match else {}


def read_json_object(path: Path, limit: int) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, reason) for a small JSON file of at most `limit` bytes.

    An empty file is an empty object. The file is a producer's: it is opened without following links or
    blocking, and bounded, so a FIFO, a symlink or a 40 MB marker is a reason, never a hang.
    """
    try:
        text = read_small_file(path, limit).decode("utf-8")
    except UnsafeFile as exc:
        return None, f"{path.name} {exc}"
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror}"
    except UnicodeDecodeError as exc:
        return None, f"{path.name} is not UTF-8 text: {exc.reason} at byte {exc.start}"
    if not text.strip():
        return {}, None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"{path.name} is not valid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"{path.name} must hold a JSON object"
    return value, None


def fields_rejection(fields: dict[str, Any]) -> str | None:
    """Why an item's fields are refused, or None: a field may not shadow a built-in template value."""
    shadowed = shadowed_builtins(fields)
    if not shadowed:
        return None
    return (f"field{'s' if len(shadowed) > 1 else ''} {', '.join(shadowed)} would shadow the built-in template "
            "value of the same name; rename the field")
