"""Names and fields of items: what an inbox entry's name and small JSON files say about the item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spoold.daemon.config import Queue

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


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, reason) for a small JSON file; an empty file is an empty object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read {path.name}: {exc}"
    if not text.strip():
        return {}, None
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"{path.name} is not valid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"{path.name} must hold a JSON object"
    return value, None
