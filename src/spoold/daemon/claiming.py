"""Turning inbox entries and work folders into items: claim, adopt, reject, create the sidecar.

Each function moves files and writes the sidecar, then returns it; the queue's
bookkeeping (`queues.QueueBook`) records what it returns. Nothing here touches
the daemon's state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from spoold.daemon.config import Config, Queue
from spoold.daemon.intake import Arrival
from spoold.daemon.items import fields_from_name, fields_rejection, item_name_for, read_json_object
from spoold.daemon.layout import HANDOFF_FILE, QueueFolders, read_handoff
from spoold.daemon.logs import fields as log_fields
from spoold.daemon.sidecar import Sidecar
from spoold.daemon.trees import check_item
from spoold.fsio import fsync_dir

log = logging.getLogger("spoold")


def create_sidecar(
    config: Config, queue: Queue, folders: QueueFolders, item: str, *, original_name: str, kind: str,
    fields: dict[str, Any], payload: list[str], extras: list[str] | None = None, origin: str | None = None,
    digests: dict[str, dict[str, str]] | None = None,
) -> Sidecar:  # fmt: skip
    """A new item's sidecar (not yet written): fields from its name, then the given ones."""
    return Sidecar.new(
        folders.sidecar_path(item), queue=queue.name, item=item, original_name=original_name, kind=kind,
        fields={**fields_from_name(queue, original_name), **fields}, step_names=[s.name for s in queue.steps],
        host=config.host, payload=payload, extras=extras, origin=origin, digests=digests,
    )  # fmt: skip


def claim(config: Config, queue: Queue, folders: QueueFolders, arrival: Arrival) -> Sidecar | None:
    """Claim a complete inbox entry: a queued item, or a rejected one already in failed/; None if it vanished.

    A queued item is durable, and its marker gone, only after `commit`, which the caller runs before using it.
    """
    fields: dict[str, Any] = {}
    rejection = arrival.rejection
    kind = "file"
    limits = queue.spec.limits
    if rejection is None and arrival.marker:
        marker_fields, problem = read_json_object(folders.inbox / arrival.marker, limits.marker_bytes)
        fields, rejection = marker_fields or {}, problem and f"ready marker {problem}"
    if queue.spec.items == "requests" and arrival.marker is None:
        kind = "request"  # named as a request even when rejected: `req.json` is item `req`
        if rejection is None:
            request, problem = read_json_object(folders.inbox / arrival.entry, limits.request_bytes)
            fields, rejection = request or {}, problem
    if kind == "file" and _is_real_dir(folders.inbox / arrival.entry):
        kind = "bundle"
    name = folders.claim(arrival.entry, item_name_for(arrival.entry, kind), keep_entry_name=(kind == "request"))
    if name is None:
        return None
    payload = [] if kind == "request" or arrival.rejection else [name]
    if rejection is None:
        rejection = fields_rejection({**fields_from_name(queue, arrival.entry), **fields})
    if rejection is None and kind != "request":
        rejection = check_item(folders.work / name / name, limits)
    sidecar = create_sidecar(config, queue, folders, name, original_name=arrival.entry, kind=kind, fields=fields,
                             payload=payload)  # fmt: skip
    if rejection is not None:
        reject(folders, sidecar, rejection)
    else:
        sidecar.write(is_folder_synced=False)  # `commit` syncs the folder once for the claims made together
        log.info("%s/%s: claimed%s", queue.name, name, "" if name == arrival.entry else f" ({arrival.entry})",
                 extra=log_fields(queue.name, name))  # fmt: skip
    return sidecar


def commit(folders: QueueFolders, claimed: list[Arrival]) -> None:
    """Make the sidecars of claims just made durable, one fsync of the status folder for all, then remove
    their ready markers (a sidecar lost to a crash before this is made again from the work folder and
    the marker, by `adopt_orphan`)."""
    if not claimed:
        return
    try:
        fsync_dir(folders.status)
    except OSError as exc:  # the claims stand in work/ all the same; their markers stay for `adopt_orphan`
        log.error("%s: cannot make the claims durable: %s", folders.status, exc)
        return
    for arrival in claimed:
        if arrival.marker:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folders.inbox / arrival.marker)


def reject(folders: QueueFolders, sidecar: Sidecar, reason: str) -> None:
    """Fail an item that cannot be handled at all, with the reason, and move it to failed/."""
    sidecar.rejected(reason)
    folders.finish(sidecar.name, "failed")
    log.error("%s/%s: rejected: %s", sidecar.doc["queue"], sidecar.name, reason,
              extra=log_fields(sidecar.doc["queue"], sidecar.name))  # fmt: skip


def adopt_orphan(config: Config, queue: Queue, folders: QueueFolders, item: str) -> Sidecar | None:
    """A work folder without a sidecar (crash between claim and sidecar, or a hand-over): make it an item.

    Returns None for an empty folder (crash before the rename), which is removed.
    """
    item_dir = folders.work / item
    handoff = read_handoff(item_dir)
    if handoff is not None:
        sidecar = create_sidecar(
            config, queue, folders, item, original_name=str(handoff.get("original_name", item)),
            kind=str(handoff.get("kind", "file")), fields=dict(handoff.get("fields", {})),
            payload=list(handoff.get("payload", [])), extras=list(handoff.get("extras", [])),
            origin=handoff.get("origin"), digests=dict(handoff.get("digests") or {}),
        )  # fmt: skip
        sidecar.write()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(item_dir / HANDOFF_FILE)
        return sidecar
    entries = [e for e in os.listdir(item_dir) if not e.startswith(".")]
    if not entries:
        os.rmdir(item_dir)
        return None
    if queue.spec.items == "requests" and (item_dir / entries[0]).is_file():
        request, problem = read_json_object(item_dir / entries[0], queue.spec.limits.request_bytes)
        sidecar = create_sidecar(config, queue, folders, item, original_name=entries[0], kind="request",
                                 fields=request or {}, payload=[])  # fmt: skip
    else:
        marker = folders.inbox / f"{item}.ready"
        fields, problem = (read_json_object(marker, queue.spec.limits.marker_bytes) if os.path.lexists(marker)
                           else ({}, None))  # fmt: skip
        problem = problem and f"ready marker {problem}"
        kind = "bundle" if (item_dir / item).is_dir() else "file"
        sidecar = create_sidecar(config, queue, folders, item, original_name=item, kind=kind, fields=fields or {},
                                 payload=[item])  # fmt: skip
        problem = problem or check_item(item_dir / item, queue.spec.limits)
    problem = problem or fields_rejection(sidecar.doc["fields"])
    if problem:
        reject(folders, sidecar, problem)
    else:
        sidecar.write()
    if queue.spec.items != "requests":
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    return sidecar


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
