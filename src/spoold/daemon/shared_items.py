"""The files of a shared queue's items on this node: claim records, the download into work/, the end in the store.

A node holding an item keeps `<queue>/claims/<name>.json` (the item's shared name,
the claim's token and attempt, the local item name once made), written before
anything is downloaded, so a restarted node knows which local items are its
claims and asks the store whether it still holds them. The item itself is
downloaded into a hidden staging folder in work/ and handed over into work/ in
one rename, with the marker's fields and the store's checkpoints, as `forward`
makes items; from there the runner treats it like any item.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold.daemon.claiming import adopt_orphan
from spoold.daemon.config import Config, Queue
from spoold.daemon.items import fields_rejection, read_json_object
from spoold.daemon.layout import ITEM_DIR_MODE, QueueFolders
from spoold.daemon.sidecar import Sidecar, error_record
from spoold.errors import Interrupted, PermanentError, StepError, TransientError
from spoold.fsio import read_json, remove_tree, write_json_atomic
from spoold.transports.base import TransferContext, TreeLimits, shown_name

if TYPE_CHECKING:
    from spoold.transports.s3_shared import InboxEntry, ShareStore

log = logging.getLogger("spoold.shared")

STAGING_PREFIX = ".shared-"
# Longer names cannot be a local file name with the `.json` of a claim record beside them.
MAX_NAME_BYTES = 240


def name_problem(name: str) -> str | None:
    """Why an inbox key cannot be an item name, or None."""
    if name in (".", "..") or not name:
        return "not an item name"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        return f"its name is longer than {MAX_NAME_BYTES} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "its name holds a control character"
    return None


@dataclasses.dataclass
class Held:
    """One claim this node holds, from the claim to the item's end in the store."""

    name: str
    token: str
    attempt: int
    etag: str
    # Monotonic time when the last successful claim write was sent: the lease runs from there.
    written_at: float
    is_bundle: bool = False
    has_marker: bool = False
    size: int = 0  # a file item's, as listed
    item: str | None = None  # the local item, once handed over
    phase: str = "fetching"  # fetching, local, finishing
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    # One claim write at a time (two with one ETag would make the second look lost), and no status copy of the
    # running item after the end's status.
    writing: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    mirrored_mtime: float = 0.0
    mirrored_at: float = 0.0  # monotonic
    retry_at: float = 0.0  # no renewal before this (monotonic), after one that could not reach the store
    download: dict[str, Any] = dataclasses.field(default_factory=dict)  # the download's checkpoint
    takeover: bool = False


    @property
    def label(self) -> str:
        """The name as log lines show it: a producer's name may hold control characters."""
        return self.name if self.name.isprintable() and len(self.name) <= 160 else shown_name(self.name)

    def entry(self) -> InboxEntry:
        """The inbox entry as this claim recorded it (for a download that a restart interrupted)."""
        from spoold.transports.s3_shared import InboxEntry

        return InboxEntry(self.name, self.is_bundle, self.size, self.has_marker)


class ClaimRecords:
    """`<queue>/claims/`: what this node holds, so a restart can tell its items from strays."""

    def __init__(self, folders: QueueFolders) -> None:
        self.folder = folders.root / "claims"

    def ensure(self) -> None:
        os.makedirs(self.folder, mode=0o750, exist_ok=True)

    def path(self, name: str) -> Path:
        # A name that cannot be a file name (too long) is recorded under its hash; its item is rejected anyway.
        file_name = name if name_problem(name) is None else "_" + hashlib.sha256(os.fsencode(name)).hexdigest()
        return self.folder / f"{file_name}.json"

    def save(self, held: Held) -> None:
        write_json_atomic(self.path(held.name), {
            "name": held.name, "token": held.token, "attempt": held.attempt, "item": held.item,
            "is_bundle": held.is_bundle, "has_marker": held.has_marker, "size": held.size, "download": held.download,
        })  # fmt: skip

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def all(self) -> list[dict[str, Any]]:
        found = []
        for file_name in sorted(os.listdir(self.folder)):
            if file_name.endswith(".json") and not file_name.startswith("."):
                record = read_json(self.folder / file_name)
                if record and isinstance(record.get("name"), str) and isinstance(record.get("token"), str):
                    found.append(record)
        return found


def fetch(config: Config, queue: Queue, folders: QueueFolders, store: ShareStore, entry: InboxEntry,
          held: Held, seed: dict[str, Any] | None, check_stop: Callable[[], None],
          save_checkpoint: Callable[[], None]) -> str | None:  # fmt: skip
    """Download the held item and make it a local item; its name, or None when it left the inbox.

    `seed` is the item's status in the store when another node held it before: its checkpoints let
    steps whose state lives remotely (an S3 multipart upload) resume instead of starting over.
    Raises PermanentError when the item must fail (a huge marker, bad fields, limits).
    """
    from spoold.transports.s3_shared import READY_SUFFIX

    if problem := name_problem(held.name) or kind_problem(queue, entry):
        raise PermanentError(problem)
    stage = folders.work / f"{STAGING_PREFIX}{held.name}"
    os.makedirs(stage, ITEM_DIR_MODE, exist_ok=True)
    is_resumable = False
    try:
        fields: dict[str, Any] = {}
        if held.has_marker or entry.is_bundle:
            data = store.read_marker("inbox", held.name, int(queue.spec.limits.marker_bytes))
            if data is None:
                return None
            (stage / READY_SUFFIX).write_bytes(data)
            found, problem = read_json_object(stage / READY_SUFFIX, int(queue.spec.limits.marker_bytes))
            if problem or (found is not None and (problem := fields_rejection(found))):
                raise PermanentError(f"ready marker {problem}")
            fields = found or {}

        # The download's checkpoint lives in the claim record, so a restart goes on where this one stopped.
        ctx = TransferContext(progress=lambda _done, _total: None, checkpoint=held.download,
                              save_checkpoint=save_checkpoint, check_stop=check_stop)  # fmt: skip
        limits = TreeLimits(queue.spec.limits.depth, queue.spec.limits.files)
        try:
            path = store.download(entry, stage, ctx, limits)
        except (Interrupted, TransientError):
            is_resumable = True
            raise
        if path is None:
            return None
        kind, payload = ("bundle" if entry.is_bundle else "file"), [held.name]
        if queue.spec.items == "requests" and not entry.is_bundle:
            # As in a local inbox: the request's JSON is the item's fields, and the file stays beside them.
            request, problem = read_json_object(path, int(queue.spec.limits.request_bytes))
            if problem or (request is not None and (problem := fields_rejection(request))):
                raise PermanentError(f"request {problem}")
            kind, payload, fields = "request", [], {**fields, **(request or {})}
        record = {"origin": f"{queue.shared.url if queue.shared else ''}{held.name}#{held.token}",
                  "original_name": held.name, "kind": kind, "fields": fields, "payload": payload, "extras": [],
                  "digests": {}}  # fmt: skip
        _clear_history(folders, held.name)
        item = folders.hand_over([(path, held.name)], held.name, record)
    finally:
        if not is_resumable:
            remove_tree(stage)
    sidecar = adopt_orphan(config, queue, folders, item)
    if sidecar is not None and seed:
        _seed_checkpoints(queue, sidecar, seed)
    return item


def kind_problem(queue: Queue, entry: InboxEntry) -> str | None:
    """Why the queue does not take this kind of item (as its local inbox would say), or None."""
    if entry.is_bundle and queue.spec.items != "bundles":
        return f"a prefix with its ready marker was put into a queue of {queue.spec.items} (items: " \
               f"{queue.spec.items}); use items: bundles to accept folders"  # fmt: skip
    if queue.spec.items == "requests" and not entry.name.endswith(".json"):
        return "a queue of requests (items: requests) takes only .json request files"
    return None


def _clear_history(folders: QueueFolders, name: str) -> None:
    """A finished local copy of the item from an earlier round (a retry) gives up its name: chains see the
    item's shared name, and the store holds its history."""
    document = read_json(folders.sidecar_path(name))
    if document is None or document.get("state") in ("done", "failed"):
        drop_local(folders, name)


def recover(store: ShareStore, records: ClaimRecords, folders: QueueFolders) -> tuple[list[Held], int]:
    """The claims a previous run left that this node still holds (the others' records go); and how many went."""
    kept, lost = [], 0
    for record in records.all():
        name, item, attempt = record["name"], record.get("item"), record.get("attempt")
        try:
            claim = store.read_claim(name)
        except StepError as exc:
            log.warning("%s/%s: cannot check the claim (%s): dropping the local copy", folders.name, name, exc)
            claim = None
        if claim is None or claim.document.get("token") != record["token"]:
            lost += 1
            records.remove(name)
            continue
        # The lease runs from the claim's last write, by the store's clock.
        written_at = time.monotonic() - max(0.0, claim.store_now - claim.modified)
        held = Held(name, record["token"], attempt if isinstance(attempt, int) else 1, claim.etag, written_at,
                    bool(record.get("is_bundle")), bool(record.get("has_marker")),
                    size=record["size"] if isinstance(record.get("size"), int) else 0,
                    download=record["download"] if isinstance(record.get("download"), dict) else {},
                    item=item if isinstance(item, str) else None)  # fmt: skip
        if held.item is not None and not os.path.exists(folders.sidecar_path(held.item)):
            held.item = None
        kept.append(held)
    return kept, lost


def _seed_checkpoints(queue: Queue, sidecar: Sidecar, seed: dict[str, Any]) -> None:
    """Carry over the checkpoints of unfinished steps whose state is remote (another node's upload id)."""
    steps = seed.get("steps")
    if not isinstance(steps, list) or len(steps) != len(queue.steps):
        return
    changed = False
    for step, entry in zip(queue.steps, steps, strict=True):
        checkpoint = entry.get("checkpoint") if isinstance(entry, dict) else None
        if step.handler.name in ("ship", "exec") and isinstance(checkpoint, dict) and checkpoint and \
                entry.get("state") not in ("done", "skipped"):  # fmt: skip
            sidecar.step_entry(step.index)["checkpoint"] = checkpoint
            changed = True
    if changed:
        sidecar.write()


def status_document(folders: QueueFolders, held: Held, node: str) -> dict[str, Any] | None:
    """The local sidecar of the held item, as the store's status shows it (with the holding node)."""
    if held.item is None:
        return None
    document = read_json(folders.sidecar_path(held.item))
    if document is None:
        return None
    document["item"] = held.name
    document["node"] = node
    document["claim"] = {"attempt": held.attempt}
    return document


def mirror(store: ShareStore, folders: QueueFolders, held: Held, node: str) -> None:
    """A running item's sidecar to the store's `status/`, when it changed since the last copy."""
    if held.phase != "local" or held.item is None:
        return
    try:
        mtime = folders.sidecar_path(held.item).stat().st_mtime
    except FileNotFoundError:
        return
    with held.writing:
        if held.phase != "local":
            return  # the end writes the last status
        if mtime != held.mirrored_mtime and (document := status_document(folders, held, node)) is not None:
            store.write_status(held.name, document)
            held.mirrored_mtime = mtime


def finish(store: ShareStore, queue: Queue, held: Held, document: dict[str, Any], *, tidy: bool = False) -> None:
    """The item's end in the store: its status, its objects to done/ or failed/ (or deleted), its claim gone.

    The status is written first: a claim found stale later whose status says done or failed is
    only tidied up by the next node, never run again. `tidy`: a node that took the claim over does
    that, and what an earlier holder already copied is not copied again.
    """
    state = document.get("state")
    store.write_status(held.name, document)
    if state == "done" and queue.spec.keep.done == "delete":
        store.remove(held.name, "inbox")
    else:
        known = None if held.is_bundle else [(held.name, held.size)] + [(held.name + ".ready", 0)] * held.has_marker
        store.move(held.name, "inbox", "done" if state == "done" else "failed", known, keep_existing=tidy)
    store.delete_claim(held.name)


def rejection_document(config: Config, queue: Queue, name: str, reason: str, node: str) -> dict[str, Any]:
    """The status of an item that failed before it became a local item (a bad name, marker or download)."""
    sidecar = Sidecar.new(Path(os.devnull), queue=queue.name, item=name, original_name=name, kind="file", fields={},
                          step_names=[s.name for s in queue.steps], host=config.host, payload=[])  # fmt: skip
    document = sidecar.doc
    document.update(state="failed", node=node, error={**error_record(None, "rejected", reason, retryable=False),
                                                      "at": document["updated"]})  # fmt: skip
    return document


def drop_local(folders: QueueFolders, item: str) -> None:
    """Remove a local item this node no longer holds: its folders and its sidecar."""
    folders.remove_item_data(item)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folders.sidecar_path(item))


def remove_stagings(folders: QueueFolders, kept: Container[str]) -> None:
    """Partial downloads of items no longer held; those of `kept` items resume."""
    for name in os.listdir(folders.work):
        if name.startswith(STAGING_PREFIX) and name[len(STAGING_PREFIX):] not in kept:
            remove_tree(folders.work / name)


def drop_strays(folders: QueueFolders, kept: set[str]) -> None:
    """A shared queue's unfinished local items exist only under a claim this node holds: drop the others."""
    for item in local_items(folders):
        if item not in kept:
            log.warning("%s/%s: not held by this node any more: dropped here", folders.name, item)
            drop_local(folders, item)


def local_items(folders: QueueFolders) -> dict[str, str]:
    """Every local item of the queue that is not finished, by name, with its state."""
    found: dict[str, str] = {}
    for file_name in os.listdir(folders.status):
        if file_name.endswith(".json") and not file_name.startswith("."):
            document = read_json(folders.status / file_name)
            if document and document.get("state") not in ("done", "failed"):
                found[file_name[: -len(".json")]] = str(document.get("state"))
    for name in os.listdir(folders.work):
        if not name.startswith(".") and name not in found:
            found[name] = "unrecorded"
    return found


def new_claim(node: str, held: Held, lease: float) -> dict[str, Any]:
    now = time.time()
    return {"node": node, "host": os.uname().nodename, "pid": os.getpid(), "token": held.token,
            "lease_s": lease, "attempt": held.attempt, "renewed": _iso(now), "expires": _iso(now + lease)}  # fmt: skip


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
