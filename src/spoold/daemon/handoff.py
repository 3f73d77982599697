"""Handing an item's payload to another local queue (forward, fetch), exactly once.

The new item is built in a staging folder and renamed into the target's work/
in one step; its record (fields, payload, origin) travels inside it. The source
step's checkpoint plus the origin stamp make a re-run after a crash find the
item it already made instead of making a second one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spoold.daemon.claiming import adopt_orphan
from spoold.daemon.config import Config, Queue
from spoold.daemon.context import ItemContext
from spoold.daemon.layout import QueueFolders, read_handoff
from spoold.errors import PermanentError
from spoold.fsio import read_json


def hand_over(
    config: Config, target: Queue, folders: QueueFolders, ctx: ItemContext, source: str,
    paths: list[Path], fields: Mapping[str, Any], name: str | None,
) -> str:  # fmt: skip
    """Make `paths` of the running item `ctx` a new item of `target`; `source` names the item (queue/item@created)."""
    key = name or ""
    origin = f"{source}#{key}"
    done: dict[str, str] = ctx.checkpoint.data.setdefault("handed_over", {})
    if key in done:
        return done[key]
    if ctx.checkpoint.data.get("handing_over") == key:
        existing = _find_by_origin(folders, origin)
        if existing is not None:
            done[key] = existing
            ctx.checkpoint.save()
            return existing
    ctx.checkpoint.data["handing_over"] = key
    ctx.checkpoint.save()

    pairs: list[tuple[Path, str]] = []
    for path in paths:
        if not path.exists():
            raise PermanentError(f"cannot hand over {path.name}: it does not exist")
        pairs.append((path, _relative(path, ctx.item_dir)))
    payload_set = {str(p) for p in ctx.payload}
    record = {
        "origin": origin,
        "original_name": name or ctx.item,
        "kind": "bundle" if any(p.is_dir() for p in paths) else "file",
        "fields": dict(fields),
        "payload": [rel for p, rel in pairs if str(p) in payload_set or not ctx.payload],
        "extras": [rel for p, rel in pairs if ctx.payload and str(p) not in payload_set],
        "digests": {rel: ctx.digests[rel] for _, rel in pairs if rel in ctx.digests},
    }
    new_name = folders.hand_over(pairs, name or ctx.item, record)
    adopt_orphan(config, target, folders, new_name)
    done[key] = new_name
    ctx.checkpoint.data.pop("handing_over", None)
    ctx.checkpoint.save()
    return new_name


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return path.name


def _find_by_origin(folders: QueueFolders, origin: str) -> str | None:
    for file_name in os.listdir(folders.status):
        if file_name.endswith(".json") and not file_name.startswith("."):
            document = read_json(folders.status / file_name)
            if document and document.get("forwarded_from") == origin:
                return str(document["item"])
    for name in os.listdir(folders.work):
        record = read_handoff(folders.work / name)
        if record and record.get("origin") == origin:
            return name
    return None
