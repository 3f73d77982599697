"""Sidecar status files: the item's public status and the durable record the daemon resumes from.

Every change of an item's status is one method here (`start_step`, `retrying`,
`failed`, `requeue`, ...), so the document's shape has one owner. Each
transition is written at once, atomically (`spoold.fsio`). Error messages are
redacted where they are made (`retries`); names and fields are kept as they are,
so an item named `token=1.txt` stays that item. Names that are not UTF-8 are
kept reversibly as JSON escapes of Python's surrogates (`\\udcff` for byte 0xff).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from spoold import __version__
from spoold.daemon.attempts import record_attempt
from spoold.fsio import DeferredWrites, encode_json, now_iso, parse_iso, read_json, write_bytes_atomic

__all__ = ["ACTIVE_STATES", "FINISHED_STEP_STATES", "SCHEMA", "STATES", "Sidecar", "error_record", "now_iso",
           "parse_iso"]  # fmt: skip

SCHEMA = "spoold.status/1"
STATES = ("queued", "running", "waiting", "retrying", "done", "failed")
ACTIVE_STATES = ("queued", "running", "waiting", "retrying")
# A step's state: pending, running, retrying, interrupted, done, skipped (its `when:` did not hold) or failed.
# A step in one of these states never runs again for this item, not on resume and not after `spoold retry`.
FINISHED_STEP_STATES = ("done", "skipped")
ARRIVING_FLAG = "arriving"
# The one step of a member of a `gather:` queue (daemon/gather.py): members wait, their group runs the chain.
GATHER_STEP = "gather"
PROGRESS_WRITE_SECONDS = 1.0


def is_safe_relative(path: object) -> bool:
    """A path inside an item's folder: relative, no `..`, no NUL."""
    if not isinstance(path, str) or not path or "\0" in path or path.startswith("/"):
        return False
    return ".." not in path.split("/")


def error_record(step: str | None, type_name: str, message: str, *, retryable: bool) -> dict[str, Any]:
    return {"step": step, "type": type_name, "message": message, "retryable": retryable}


class Sidecar:
    """One item's status document, owned by whoever runs the item; writes are serialized."""

    def __init__(self, path: Path, document: dict[str, Any]) -> None:
        self.path = path
        self.doc = document
        self._lock = threading.RLock()
        self._last_progress_write = 0.0
        # Progress held back by the once-a-second limit is written by `_DEFERRED` unless another write carries it.
        self._is_flush_scheduled = False
        self._is_progress_unwritten = False
        # A step's end held for the write that starts the next step (`step_done(is_written=False)`).
        self._is_end_unwritten = False
        self._is_removed = False
        self._step_began: dict[int, float] = {}  # step index -> time.monotonic() when this process started it

    @classmethod
    def new(
        cls, path: Path, *, queue: str, item: str, original_name: str, kind: str, fields: dict[str, Any],
        step_names: list[str], host: str, payload: list[str], extras: list[str] | None = None,
        origin: str | None = None, digests: dict[str, dict[str, str]] | None = None,
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
            "payload": payload,
            "extras": extras or [],
            "digests": digests or {},
        }
        if origin:
            document["forwarded_from"] = origin
        return cls(path, document)

    @classmethod
    def load(cls, path: Path) -> Sidecar | None:
        """The sidecar at `path`, or None when it is missing or not one the daemon could have written.

        Checked before use: the item's name is the file's own, and payload paths stay inside the item.
        """
        document = read_json(path)
        if document is None or document.get("schema") != SCHEMA or document.get("item") != path.name[:-5]:
            return None
        if not isinstance(document.get("steps"), list) or document.get("state") not in STATES:
            return None
        if not all(isinstance(s, dict) for s in document["steps"]):
            return None
        for key in ("payload", "extras"):
            if not all(is_safe_relative(p) for p in document.setdefault(key, [])):
                return None
        if not isinstance(document.setdefault("digests", {}), dict):
            document["digests"] = {}
        if not isinstance(document.get("fields"), dict):
            document["fields"] = {}
        return cls(path, document)

    # ---- reading ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self.doc["state"])

    @property
    def name(self) -> str:
        return str(self.doc["item"])

    @property
    def error(self) -> dict[str, Any] | None:
        error = self.doc.get("error")
        return error if isinstance(error, dict) else None

    @property
    def is_arriving(self) -> bool:
        return bool(self.doc.get(ARRIVING_FLAG))

    def next_attempt_at(self) -> float | None:
        return parse_iso(self.doc.get("next_attempt_at"))

    def step_entry(self, index: int) -> dict[str, Any]:
        steps: list[dict[str, Any]] = self.doc["steps"]
        return steps[index]

    def current_step_index(self) -> int | None:
        """The step running now, or the first one not done yet."""
        steps: list[dict[str, Any]] = self.doc["steps"]
        for index, entry in enumerate(steps):
            if entry.get("name") == self.doc.get("step") and entry.get("state") not in FINISHED_STEP_STATES:
                return index
        return next((i for i, e in enumerate(steps) if e.get("state") not in FINISHED_STEP_STATES), None)

    # ---- writing ---------------------------------------------------------------------------------------------

    def write(self, *, is_folder_synced: bool = True) -> None:
        """Replace the file durably; without `is_folder_synced` the caller fsyncs the status folder after."""
        with self._lock:
            self._is_progress_unwritten = self._is_end_unwritten = False
            # Any write carries the progress so far: the next progress-only write waits its second from here,
            # so a step over in less (a 1 KiB checksum) costs no durable write of its progress.
            self._last_progress_write = time.monotonic()
            self.doc["updated"] = now_iso()
            write_bytes_atomic(self.path, encode_json(self.doc), is_folder_synced=is_folder_synced)

    def write_held(self) -> None:
        """Write a step's end that `step_done` held back, if any: before anything waits or moves the item."""
        with self._lock:
            if self._is_end_unwritten:
                self.write()

    def write_progress(self) -> None:
        """Write at most once a second; what arrives in between is written when the second is up.

        Without the deferred write, the last progress before a quiet spell (a remote job's log tail, a
        transfer's final bytes before a long far-side verification) would never reach the sidecar.
        """
        with self._lock:
            wait = PROGRESS_WRITE_SECONDS - (time.monotonic() - self._last_progress_write)
            if wait <= 0:
                self._last_progress_write = time.monotonic()
                self.write()
                return
            self._is_progress_unwritten = True
            if not self._is_flush_scheduled:
                self._is_flush_scheduled = True
                _DEFERRED.schedule(time.monotonic() + wait, self._flush_progress)

    def _flush_progress(self) -> None:
        with self._lock:
            self._is_flush_scheduled = False
            if not self._is_progress_unwritten or self._is_removed:
                return
            self._last_progress_write = time.monotonic()
            # A full or read-only disk: the next write carries this progress, and the daemon says why.
            with contextlib.suppress(OSError):
                self.write()

    def remove(self) -> None:
        with self._lock:
            self._is_removed = True
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ---- transitions -----------------------------------------------------------------------------------------

    def sync_steps(self, step_names: list[str]) -> None:
        """Match the steps list to the chain (it may have changed across a restart)."""
        steps: list[dict[str, Any]] = self.doc["steps"]
        for index, name in enumerate(step_names):
            if index >= len(steps) or not isinstance(steps[index], dict):
                steps[index:index + 1] = [{"name": name, "state": "pending"}]
            elif steps[index].get("name") != name:
                steps[index] = {"name": name, "state": "pending"}
        del steps[len(step_names) :]

    def mark_arriving(self) -> None:
        self.doc[ARRIVING_FLAG] = True
        self.write()

    def arrival_settled(self, fields: dict[str, Any]) -> None:
        """The bundle's ready marker came: its fields join the item's."""
        self.doc["fields"].update(fields)
        self.doc.pop(ARRIVING_FLAG, None)
        self.write()

    def start_step(self, index: int) -> dict[str, Any]:
        entry = self.step_entry(index)
        entry.setdefault("attempt", 1)
        if entry.get("state") == "running" and entry.get("started"):
            # Left running by a crash (kill -9, power loss): that attempt ended without a word.
            record_attempt(entry, "interrupted", is_crash=True)
        entry.update(state="running", started=now_iso())
        self._step_began[index] = time.monotonic()
        # What the last attempt reported is not this one's: a fresh attempt starts without progress.
        for stale in ("finished", "error", "progress", "waiting", "bytes", "duration_s"):
            entry.pop(stale, None)
        self.doc.update(state="running", step=entry["name"], attempts=entry["attempt"], next_attempt_at=None,
                        error=None)  # fmt: skip
        self.write()
        return entry

    def _elapsed(self, index: int) -> float | None:
        """Seconds since this process started the step's current attempt (monotonic), None if it did not."""
        began = self._step_began.pop(index, None)
        return None if began is None else time.monotonic() - began

    def step_done(self, index: int, result: dict[str, Any], *, payload: list[str] | None, extras: list[str],
                  fields: dict[str, Any], is_written: bool = True) -> None:  # fmt: skip
        """The step is over. `is_written=False` holds the write for the next one, which the caller makes at once
        (the next step's start, a skip, or `write_held`): one durable write where two followed each other with
        nothing done between them, so a crash between them loses nothing that happened."""
        if payload is not None:
            self.doc["payload"] = payload
        for extra in extras:
            if extra not in self.doc["extras"]:
                self.doc["extras"].append(extra)
        self.doc["fields"].update(fields)
        entry = self.step_entry(index)
        entry.update(state="done", finished=now_iso(), result=result)
        record = record_attempt(entry, "done", elapsed=self._elapsed(index))
        entry.update({k: record[k] for k in ("bytes", "duration_s") if k in record})
        for transient in ("progress", "waiting", "checkpoint"):
            entry.pop(transient, None)
        if is_written:
            self.write()
        else:
            with self._lock:
                self._is_end_unwritten = True

    def skipped(self, index: int, reason: str) -> None:
        """The step's `when:` did not hold; `reason` names the condition that failed. The item goes on."""
        entry = self.step_entry(index)
        entry.update(state="skipped", finished=now_iso(), skipped=reason)
        self.write()

    def interrupted(self, index: int | None) -> None:
        """Stopped mid-step: the checkpoint stays and the next start resumes from it."""
        if index is not None:
            entry = self.step_entry(index)
            if entry.get("state") == "running":
                record_attempt(entry, "interrupted", elapsed=self._elapsed(index))
            entry["state"] = "interrupted"
        self.doc["state"] = "queued"
        self.write()

    def retrying(self, index: int | None, error: dict[str, Any], next_attempt: int, at: float) -> None:
        self.doc.update(state="retrying", error=error, next_attempt_at=now_iso(at), attempts=next_attempt - 1)
        if index is not None:
            entry = self.step_entry(index)
            entry.update(finished=now_iso(), error=error)
            record_attempt(entry, "retrying", elapsed=self._elapsed(index))
            entry.update(state="retrying", attempt=next_attempt)
        self.write()

    def failed(self, index: int | None, error: dict[str, Any]) -> None:
        self.doc.update(state="failed", error=error, next_attempt_at=None)
        if index is not None:
            entry = self.step_entry(index)
            was_running = entry.get("state") in ("running", "waiting")
            entry.update(state="failed", error=error, finished=now_iso())
            if was_running:
                record_attempt(entry, "failed", elapsed=self._elapsed(index))
        self.write()

    def rejected(self, reason: str) -> None:
        self.failed(None, error_record(None, "rejected", reason, retryable=False))

    def vanished(self) -> None:
        self.failed(None, error_record(self.doc.get("step"), "missing", "the item's folder vanished from work/",
                                       retryable=False))  # fmt: skip

    def unrecorded_failure(self, *, gives_up: bool) -> None:
        """A failed attempt that could not be written (a full disk): counted in memory, so it still ends."""
        if gives_up:
            self.doc["state"] = "failed"
        else:
            self.doc["attempts"] = max(1, int(self.doc.get("attempts") or 1)) + 1

    def done(self) -> None:
        self.doc.update(state="done", step=None, error=None, next_attempt_at=None)
        self.write()

    def requeue(self) -> None:
        """`spoold retry`: every step not done (or skipped) runs again with fresh attempts."""
        for entry in self.doc["steps"]:
            if entry.get("state") not in FINISHED_STEP_STATES:
                entry.update(state="pending", attempt=1)
                entry.pop("error", None)
        self.doc.update(state="queued", error=None, next_attempt_at=None, attempts=0)
        self.write()

    def set_waiting(self, index: int, message: str, next_check_at: float) -> bool:
        """Record what the step waits for; True when the item's state changed to `waiting`."""
        self.step_entry(index)["waiting"] = {"for": message, "next_check_at": now_iso(next_check_at)}
        if self.doc["state"] == "waiting":
            self.write_progress()
            return False
        self.doc["state"] = "waiting"
        self.write()
        return True

    def set_progress(self, index: int, progress: dict[str, Any]) -> bool:
        """Record a step's progress; True when this ended a wait (the state is `running` again)."""
        entry = self.step_entry(index)
        entry.setdefault("progress", {}).update(progress)
        if self.doc["state"] == "waiting":
            self.doc["state"] = "running"
            entry.pop("waiting", None)
            self.write()
            return True
        self.write_progress()
        return False

    # ---- gathering (daemon/gather.py) ------------------------------------------------------------------------

    def gather_waiting(self, info: dict[str, Any]) -> None:
        """A member waits for its group: `info` says who the group has and misses, its deadline, and once the
        group is whole, the name of the group's item. The member's only step is `gather`."""
        steps: list[dict[str, Any]] = self.doc["steps"]
        entry = steps[0] if len(steps) == 1 and steps[0].get("name") == GATHER_STEP else {"name": GATHER_STEP}
        entry.update(state="waiting")
        entry.setdefault("started", now_iso())
        for stale in ("finished", "error", "result"):
            entry.pop(stale, None)
        self.doc.update(steps=[entry], state="waiting", step=GATHER_STEP, gather=info, error=None,
                        next_attempt_at=None)  # fmt: skip
        self.write()

    def gather_ended(self, state: str, error: dict[str, Any] | None) -> None:
        """A member ends as its group's item did (`done`, or `failed` with `error`); its data went into it."""
        entry = self.step_entry(0)
        entry.update(state=state, finished=now_iso())
        if error is not None:
            entry["error"] = error
        self.doc.update(state=state, step=None if state == "done" else GATHER_STEP, error=error,
                        next_attempt_at=None, payload=[], extras=[])  # fmt: skip
        self.write()

    def mark_gathered(self, info: dict[str, Any]) -> None:
        """A group item: its group's name and which member each folder of its payload came from."""
        self.doc["gathered"] = info
        self.write()


_DEFERRED = DeferredWrites()
