"""Bundles still arriving, for a queue whose first step starts early (`encode: {stream: true}`).

Such a queue makes an item of a bundle as soon as its folder appears in the
inbox: the item's work folder and sidecar (`"arriving": true`) are created and
the first step starts reading the folder where it is, through an open
descriptor, while the producer writes it; close-after-write and move events
inside it are passed on to the step. When the ready marker arrives the folder
is renamed into the work folder as for any bundle, and the marker's fields join
the item's. Until then the item is provisional: nothing else happens to it (no
later step, no recorded failure, no move to failed/), and if the folder leaves
the inbox without a marker the item is dropped, since nothing was handed over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from spoold.daemon import claiming
from spoold.daemon.intake import READY_SUFFIX, Arrival
from spoold.daemon.items import create_sidecar, read_json_object
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar
from spoold.errors import Interrupted

if TYPE_CHECKING:
    from spoold.daemon.scheduler import Daemon, QueueState

log = logging.getLogger("spoold")

SIDECAR_FLAG = "arriving"
_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ArrivingItem:
    """The daemon's side of `ArrivingBundle`: events in, completion or abandonment signalled to the step."""

    def __init__(self, entry: str, item: str, root_fd: int, stop_event: threading.Event) -> None:
        self.entry = entry
        self.item = item
        self.root_fd = root_fd
        self.fields: dict[str, Any] = {}
        self.rejection: str | None = None
        self.is_abandoned = False
        self._is_complete = False
        self._landed: list[str] = []
        self._changed = threading.Condition()
        self._stop_event = stop_event

    # ---- called by the scheduler -------------------------------------------------------------------------------

    def touched(self, relative: str, is_landed: bool) -> None:
        with self._changed:
            if is_landed:
                self._landed.append(relative)
            self._changed.notify_all()

    def complete(self, fields: dict[str, Any], rejection: str | None) -> None:
        with self._changed:
            self.fields, self.rejection, self._is_complete = fields, rejection, True
            self._changed.notify_all()

    def abandon(self) -> None:
        with self._changed:
            self.is_abandoned = True
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.root_fd)

    # ---- called by the step ------------------------------------------------------------------------------------

    def take_landed(self) -> list[str]:
        with self._changed:
            landed, self._landed = self._landed, []
        return landed

    def is_complete(self) -> bool:
        return self._is_complete

    def wait(self, timeout: float) -> None:
        with self._changed:
            if not (self._landed or self._is_complete or self.is_abandoned or self._stop_event.is_set()):
                self._changed.wait(timeout)
        self._check()

    def wait_complete(self, poll_seconds: float = 1.0) -> None:
        """Block until the marker arrives; `Interrupted` on stop or if the bundle left the inbox."""
        with self._changed:
            while not self._is_complete:
                self._check()
                self._changed.wait(poll_seconds)

    def _check(self) -> None:
        if self.is_abandoned:
            raise Interrupted("the bundle left the inbox before its ready marker")
        if self._stop_event.is_set():
            raise Interrupted("the daemon is stopping")


def on_arrival(daemon: Daemon, state: QueueState, arrival: Arrival) -> None:
    """Act on what intake reports: a folder to start early, the marker of one arriving, or a complete entry."""
    if arrival.is_early:
        start(daemon, state, arrival.entry)
        return
    # An abandoned item's folder was replaced: the marker belongs to the new folder, a new item.
    early = next((a for a in state.arriving.values() if a.entry == arrival.entry and not a.is_abandoned), None)
    if early is not None:
        complete(daemon, state, early)
    else:
        claiming.accept(daemon, state, arrival)


def on_event(state: QueueState, parts: tuple[str, ...], is_landed: bool) -> None:
    """An inbox event at `parts` (relative to the inbox): tell the step reading that bundle, if any."""
    for item in state.arriving.values():
        if len(parts) > 1 and item.entry == parts[0]:
            item.touched("/".join(parts[1:]), is_landed)


def start(daemon: Daemon, state: QueueState, entry: str) -> None:
    """A bundle folder appeared: make it a provisional item whose first step starts now."""
    folders = state.folders
    try:
        root_fd = os.open(folders.inbox / entry, _OPEN_FLAGS)
    except OSError:
        return  # gone already, or not a folder: intake looks at it again on its next event
    name = folders.reserve(entry)
    sidecar = create_sidecar(daemon.config, state.queue, folders, name, original_name=entry, kind="bundle",
                             fields={}, payload=[name])  # fmt: skip
    sidecar.doc[SIDECAR_FLAG] = True
    sidecar.write()
    _track(daemon, state, sidecar, ArrivingItem(entry, name, root_fd, daemon.stop_event))
    log.info("%s/%s: arriving; %s starts before the ready marker", state.queue.name, name, state.queue.steps[0].name)


def _track(daemon: Daemon, state: QueueState, sidecar: Sidecar, arriving: ArrivingItem) -> None:
    state.arriving[sidecar.name] = arriving
    state.intake.receiving.add(arriving.entry)
    state.sidecars[sidecar.name] = sidecar
    daemon._set_state(state.queue.name, sidecar.name, sidecar.state)
    state.pending.append(sidecar.name)


def complete(daemon: Daemon, state: QueueState, arriving: ArrivingItem) -> None:
    """The ready marker arrived: move the folder into the item, then let whoever owns the sidecar settle it."""
    folders = state.folders
    fields, rejection = _read_marker(folders, arriving.entry)
    try:
        os.rename(folders.inbox / arriving.entry, folders.work / arriving.item / arriving.item)
    except FileNotFoundError:
        abandon(daemon, state, arriving)
        return
    del state.arriving[arriving.item]
    state.intake.receiving.discard(arriving.entry)
    arriving.complete(fields, rejection)
    if arriving.item not in state.running:
        # Nobody else holds the sidecar: settle it here (a running item's runner does it).
        _settle_here(daemon, state, state.sidecars[arriving.item], arriving.entry, fields, rejection)
        arriving.close()


def _read_marker(folders: QueueFolders, entry: str) -> tuple[dict[str, Any], str | None]:
    """(fields, rejection) from the bundle's ready marker."""
    fields, problem = read_json_object(folders.inbox / f"{entry}{READY_SUFFIX}")
    return fields or {}, problem and f"ready marker {problem}"


def _settle_here(daemon: Daemon, state: QueueState, sidecar: Sidecar, entry: str, fields: dict[str, Any],
                 rejection: str | None) -> None:  # fmt: skip
    settle(state.folders, sidecar, entry, fields)
    if rejection:
        claiming.reject(daemon, state, sidecar, rejection)
        state.sidecars.pop(sidecar.name, None)


def settle(folders: QueueFolders, sidecar: Sidecar, entry: str, fields: dict[str, Any]) -> None:
    """Record a completed arrival in the sidecar: the marker's fields join the item's, the marker goes."""
    sidecar.doc["fields"].update(fields)
    sidecar.doc.pop(SIDECAR_FLAG, None)
    sidecar.write()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folders.inbox / f"{entry}{READY_SUFFIX}")


def check_still_there(daemon: Daemon, state: QueueState) -> None:
    """Drop provisional items whose folder left the inbox (or was replaced) without a marker."""
    for arriving in list(state.arriving.values()):
        try:
            info, held = os.lstat(state.folders.inbox / arriving.entry), os.fstat(arriving.root_fd)
            is_same = (info.st_dev, info.st_ino) == (held.st_dev, held.st_ino)
        except (FileNotFoundError, NotADirectoryError):
            is_same = False
        except OSError:
            continue  # cannot tell now (e.g. permissions changed): keep it, look again at the next rescan
        if not is_same:
            abandon(daemon, state, arriving)


def abandon(daemon: Daemon, state: QueueState, arriving: ArrivingItem) -> None:
    arriving.abandon()
    if arriving.item not in state.running:
        discard(daemon, state, arriving)


def discard(daemon: Daemon, state: QueueState, arriving: ArrivingItem) -> None:
    """Remove every trace of a provisional item (the running step, if any, has ended)."""
    arriving.close()
    _drop(daemon, state, arriving.item, arriving.entry)


def _drop(daemon: Daemon, state: QueueState, name: str, entry: str) -> None:
    folders = state.folders
    state.arriving.pop(name, None)
    state.intake.receiving.discard(entry)
    state.sidecars.pop(name, None)
    state.retry_at.pop(name, None)
    folders.remove_item_data(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folders.sidecar_path(name))
    daemon._forget(state.queue.name, name)
    log.info("%s/%s: the bundle left the inbox before its ready marker; the provisional item is dropped",
             state.queue.name, name)  # fmt: skip


def resume(daemon: Daemon, state: QueueState, sidecar: Sidecar) -> None:
    """After a restart: an item that was still arriving is settled, tracked again, or dropped."""
    folders, name = state.folders, sidecar.name
    entry = str(sidecar.doc.get("original_name", name))
    if (folders.work / name / name).exists():
        # Renamed in before the crash; the marker (removed last) still holds the fields.
        fields, rejection = _read_marker(folders, entry)
        _settle_here(daemon, state, sidecar, entry, fields, rejection)
        if not rejection:
            daemon._schedule_existing(state, name)
        return
    try:
        root_fd = os.open(folders.inbox / entry, _OPEN_FLAGS)
    except OSError:
        _drop(daemon, state, name, entry)
        return
    _track(daemon, state, sidecar, ArrivingItem(entry, name, root_fd, daemon.stop_event))
