"""Turning a claimed or handed-over work folder into an item with its sidecar."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import HANDOFF_FILE, QueueFolders, read_handoff
from spoold.daemon.sidecar import Sidecar

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


def create_sidecar(
    config: Config, queue: Queue, folders: QueueFolders, item: str, *, original_name: str, kind: str,
    fields: dict[str, Any], payload: list[str], extras: list[str] | None = None,
    origin: str | None = None,
) -> Sidecar:  # fmt: skip
    sidecar = Sidecar.new(
        folders.sidecar_path(item), queue=queue.name, item=item, original_name=original_name, kind=kind,
        fields={**fields_from_name(queue, original_name), **fields}, step_names=[s.name for s in queue.steps],
        host=config.host,
    )  # fmt: skip
    sidecar.doc["payload"] = payload
    sidecar.doc["extras"] = extras or []
    if origin:
        sidecar.doc["forwarded_from"] = origin
    return sidecar


def adopt_orphan(config: Config, queue: Queue, folders: QueueFolders, item: str) -> Sidecar | None:
    """A work folder without a sidecar (crash between claim and sidecar): make it an item again.

    Returns None for an empty folder (crash before the rename), which is removed.
    """
    item_dir = folders.work / item
    handoff = read_handoff(item_dir)
    if handoff is not None:
        sidecar = create_sidecar(
            config, queue, folders, item, original_name=str(handoff.get("original_name", item)),
            kind=str(handoff.get("kind", "file")), fields=dict(handoff.get("fields", {})),
            payload=list(handoff.get("payload", [])), extras=list(handoff.get("extras", [])),
            origin=handoff.get("origin"),
        )  # fmt: skip
        if digests := handoff.get("digests"):
            sidecar.doc["digests"] = digests
        sidecar.write()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(item_dir / HANDOFF_FILE)
        return sidecar
    entries = [e for e in os.listdir(item_dir) if not e.startswith(".")]
    if not entries:
        os.rmdir(item_dir)
        return None
    if queue.spec.items == "requests" and (item_dir / entries[0]).is_file():
        request, _ = read_json_object(item_dir / entries[0])
        sidecar = create_sidecar(config, queue, folders, item, original_name=entries[0], kind="request",
                                 fields=request or {}, payload=[])  # fmt: skip
    else:
        marker = folders.inbox / f"{item}.ready"
        fields, _ = read_json_object(marker) if marker.exists() else ({}, None)
        kind = "bundle" if (item_dir / item).is_dir() else "file"
        sidecar = create_sidecar(config, queue, folders, item, original_name=item, kind=kind, fields=fields or {},
                                 payload=[item])  # fmt: skip
    sidecar.write()
    if queue.spec.items != "requests":
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    return sidecar
