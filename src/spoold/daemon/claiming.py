"""Claiming: a complete inbox entry becomes an item, with its fields, or a rejected one in failed/."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold.daemon.intake import Arrival
from spoold.daemon.items import create_sidecar, item_name_for, read_json_object
from spoold.daemon.sidecar import Sidecar, now_iso

if TYPE_CHECKING:
    from spoold.daemon.scheduler import Daemon, QueueState

log = logging.getLogger("spoold")


def accept(daemon: Daemon, state: QueueState, arrival: Arrival) -> None:
    """Claim a complete inbox entry and make it an item (or a rejected one, in failed/)."""
    folders, queue = state.folders, state.queue
    fields: dict[str, Any] = {}
    rejection = arrival.rejection
    kind = "file"
    if rejection is None and arrival.marker:
        marker_fields, problem = read_json_object(folders.inbox / arrival.marker)
        fields, rejection = marker_fields or {}, problem and f"ready marker {problem}"
    if rejection is None and queue.spec.items == "requests" and arrival.marker is None:
        kind = "request"
        request, problem = read_json_object(folders.inbox / arrival.entry)
        fields, rejection = request or {}, problem
    if kind == "file" and _is_real_dir(folders.inbox / arrival.entry):
        kind = "bundle"
    name = folders.claim(arrival.entry, item_name_for(arrival.entry, kind), keep_entry_name=(kind == "request"))
    if name is None:
        return
    payload = [] if kind == "request" or arrival.rejection else [name]
    sidecar = create_sidecar(daemon.config, queue, folders, name, original_name=arrival.entry, kind=kind,
                             fields=fields, payload=payload)  # fmt: skip
    if rejection is not None:
        reject(daemon, state, sidecar, rejection)
    else:
        sidecar.write()
        daemon._set_state(queue.name, name, "queued")
        state.sidecars[name] = sidecar
        state.pending.append(name)
        log.info("%s/%s: claimed%s", queue.name, name, "" if name == arrival.entry else f" ({arrival.entry})")
    if arrival.marker:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folders.inbox / arrival.marker)


def reject(daemon: Daemon, state: QueueState, sidecar: Sidecar, reason: str) -> None:
    error = {"step": None, "type": "rejected", "message": reason, "retryable": False}
    sidecar.doc.update(state="failed", error=error)
    sidecar.write()
    state.folders.finish(sidecar.name, "failed")
    daemon._set_state(state.queue.name, sidecar.name, "failed")
    daemon.last_error = {"queue": state.queue.name, "item": sidecar.name, **error, "at": now_iso()}
    log.error("%s/%s: rejected: %s", state.queue.name, sidecar.name, reason)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
