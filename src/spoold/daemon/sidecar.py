"""Sidecar status files: the item's public status and the durable record the daemon resumes from.

Always replaced atomically (temp file in the same folder, fsync, rename, fsync
the folder), so a reader never sees a partial file and a crash never loses the
last state written. The whole document passes through `redact()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold import __version__
from spoold.redact import redact

SCHEMA = "spoold.status/1"
STATES = ("queued", "running", "waiting", "retrying", "done", "failed")
FILE_MODE = 0o640


def now_iso(ts: float | None = None) -> str:
    """UTC time as `2026-11-21T10:00:01.120Z`."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def write_json_atomic(path: Path, document: dict[str, Any], mode: int = FILE_MODE) -> None:
    """Replace `path` with `document` so that readers see the old or the new file, never a mix."""
    data = redact(json.dumps(document, indent=2, ensure_ascii=False, default=str)).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when it is missing or not an object."""
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


class Sidecar:
    """One item's status document, owned by whoever runs the item; writes are serialized."""

    def __init__(self, path: Path, document: dict[str, Any]) -> None:
        self.path = path
        self.doc = document
        self._lock = threading.RLock()
        self._last_progress_write = 0.0

    @classmethod
    def new(
        cls, path: Path, *, queue: str, item: str, original_name: str, kind: str, fields: dict[str, Any],
        step_names: list[str], host: str,
    ) -> Sidecar:  # fmt: skip
        stamp = now_iso()
        document: dict[str, Any] = {
            "schema": SCHEMA,
            "queue": queue,
            "item": item,
            "original_name": original_name,
            "kind": kind,
            "state": "queued",
            "step": None,
            "fields": fields,
            "steps": [{"name": name, "state": "pending"} for name in step_names],
            "attempts": 0,
            "next_attempt_at": None,
            "error": None,
            "created": stamp,
            "updated": stamp,
            "host": host,
            "spoold_version": __version__,
            "payload": [],
            "extras": [],
            "digests": {},
        }
        return cls(path, document)

    @classmethod
    def load(cls, path: Path) -> Sidecar | None:
        document = read_json(path)
        if document is None or document.get("schema") != SCHEMA:
            return None
        document.setdefault("payload", [])
        document.setdefault("extras", [])
        document.setdefault("digests", {})
        return cls(path, document)

    @property
    def state(self) -> str:
        return str(self.doc["state"])

    @property
    def name(self) -> str:
        return str(self.doc["item"])

    def write(self) -> None:
        with self._lock:
            self.doc["updated"] = now_iso()
            write_json_atomic(self.path, self.doc)

    def write_progress(self) -> None:
        """Write at most once a second; progress between writes is simply newer next time."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_progress_write >= 1.0:
                self._last_progress_write = now
                self.write()

    def step_entry(self, index: int) -> dict[str, Any]:
        steps: list[dict[str, Any]] = self.doc["steps"]
        return steps[index]

    def sync_steps(self, step_names: list[str]) -> None:
        """Match the steps list to the chain (it may have changed across a restart)."""
        steps: list[dict[str, Any]] = self.doc["steps"]
        for index, name in enumerate(step_names):
            if index >= len(steps):
                steps.append({"name": name, "state": "pending"})
            elif steps[index].get("name") != name:
                steps[index] = {"name": name, "state": "pending"}
        del steps[len(step_names) :]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
