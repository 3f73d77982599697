"""Resuming after a restart or a crash: the sidecars are the durable record.

Every state a `kill -9` can leave is handled here: a staging folder from an
unfinished hand-over, a claimed folder without a sidecar, a finished item not
yet moved out of work/, a ready marker not yet removed, a sidecar temp file, a
bundle that was still arriving (see `arriving`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import TYPE_CHECKING

from spoold.daemon import arriving
from spoold.daemon.config import Queue
from spoold.daemon.items import adopt_orphan
from spoold.daemon.layout import HANDOFF_FILE, HANDOFF_PREFIX, QueueFolders
from spoold.daemon.sidecar import Sidecar

if TYPE_CHECKING:
    from spoold.daemon.scheduler import Daemon, QueueState

log = logging.getLogger("spoold.recovery")
ACTIVE_STATES = ("queued", "running", "waiting", "retrying")


def recover(daemon: Daemon, state: QueueState) -> None:
    folders, queue = state.folders, state.queue
    for name in os.listdir(folders.status):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folders.status / name)
    for name in os.listdir(folders.work):
        if name.startswith(HANDOFF_PREFIX):
            shutil.rmtree(folders.work / name, ignore_errors=True)
    known: set[str] = set()
    for file_name in sorted(os.listdir(folders.status)):
        if not file_name.endswith(".json") or file_name.startswith("."):
            continue
        sidecar = Sidecar.load(folders.status / file_name)
        if sidecar is None:
            log.warning("%s: ignoring unreadable sidecar %s", queue.name, file_name)
            continue
        known.add(sidecar.name)
        _resume(daemon, state, sidecar)
    for name in sorted(os.listdir(folders.work)):
        if name in known or name.startswith("."):
            continue
        sidecar = adopt_orphan(daemon.config, queue, folders, name)
        if sidecar is not None:
            log.info("%s/%s: recovered a claimed item without a sidecar", queue.name, name)
            daemon._schedule_existing(state, name)


def _resume(daemon: Daemon, state: QueueState, sidecar: Sidecar) -> None:
    folders, queue = state.folders, state.queue
    name = sidecar.name
    # A kill between writing a handed-over item's sidecar and removing its record leaves the record behind.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folders.work / name / HANDOFF_FILE)
    if sidecar.state in ("done", "failed"):
        if (folders.work / name).exists():
            if sidecar.state == "done":
                settle_finished(queue, folders, sidecar)
            else:
                folders.finish(name, "failed")
        daemon._set_state(queue.name, name, sidecar.state)
        return
    if sidecar.state not in ACTIVE_STATES:
        return
    if sidecar.doc.get(arriving.SIDECAR_FLAG) and (folders.work / name).is_dir():
        arriving.resume(daemon, state, sidecar)
        return
    if not (folders.work / name).is_dir():
        sidecar.doc.update(state="failed", error={"step": sidecar.doc.get("step"), "type": "missing",
                           "message": "the item's folder vanished from work/", "retryable": False})  # fmt: skip
        sidecar.write()
        daemon._set_state(queue.name, name, "failed")
        return
    if sidecar.doc.get("kind") == "bundle":
        original = str(sidecar.doc.get("original_name", name))
        if not os.path.lexists(folders.inbox / original):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folders.inbox / f"{original}.ready")
    daemon._schedule_existing(state, name)


def settle_finished(queue: Queue, folders: QueueFolders, sidecar: Sidecar) -> None:
    """Move a done item to done/, or delete its data when the queue keeps nothing."""
    if queue.spec.keep.done == "delete":
        folders.remove_item_data(sidecar.name)
    else:
        folders.finish(sidecar.name, "done")


def pick_up(daemon: Daemon, state: QueueState) -> None:
    """Items that appeared in work/ behind the daemon's back (`spoold retry`)."""
    for name in os.listdir(state.folders.work):
        if name.startswith(".") or name in state.sidecars or name in state.running:
            continue
        sidecar = Sidecar.load(state.folders.sidecar_path(name))
        if sidecar is None:
            if adopt_orphan(daemon.config, state.queue, state.folders, name) is None:
                continue
        elif sidecar.state not in ACTIVE_STATES:
            continue
        log.info("%s/%s: picked up from work/", state.queue.name, name)
        daemon._schedule_existing(state, name)
