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

The functions below act on files and return what they found; the queue's
bookkeeping (`queues.QueueBook`) records it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Literal

from spoold.daemon.claiming import create_sidecar
from spoold.daemon.config import Config, Limits, Queue
from spoold.daemon.intake import READY_SUFFIX
from spoold.daemon.items import fields_rejection, read_json_object
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar
from spoold.daemon.trees import check_item
from spoold.errors import Interrupted

log = logging.getLogger("spoold")

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

    # ---- called by the main loop --------------------------------------------------------------------------------

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


def start(config: Config, queue: Queue, folders: QueueFolders, entry: str,
          stop_event: threading.Event) -> tuple[Sidecar, ArrivingItem] | None:  # fmt: skip
    """A bundle folder appeared: make it a provisional item whose first step may start now."""
    try:
        root_fd = os.open(folders.inbox / entry, _OPEN_FLAGS)
    except OSError:
        return None  # gone already, or not a folder: intake looks at it again on its next event
    try:
        name = folders.reserve(entry)
        sidecar = create_sidecar(config, queue, folders, name, original_name=entry, kind="bundle", fields={},
                                 payload=[name])  # fmt: skip
        sidecar.mark_arriving()
    except BaseException:
        os.close(root_fd)
        raise
    log.info("%s/%s: arriving; %s starts before the ready marker", queue.name, name, queue.steps[0].name)
    return sidecar, ArrivingItem(entry, name, root_fd, stop_event)


def read_marker(folders: QueueFolders, entry: str, limits: Limits) -> tuple[dict[str, Any], str | None]:
    """(fields, rejection) from the bundle's ready marker."""
    fields, problem = read_json_object(folders.inbox / f"{entry}{READY_SUFFIX}", limits.marker_bytes)
    return fields or {}, (problem and f"ready marker {problem}") or fields_rejection(fields or {})


def moved_in_rejection(folders: QueueFolders, item: str, limits: Limits) -> str | None:
    """The bundle is whole and in work/: what it holds is checked like any claimed bundle's."""
    return check_item(folders.work / item / item, limits)


def move_in(folders: QueueFolders, arriving: ArrivingItem) -> bool:
    """The marker came: rename the folder into the item's work folder; False if it left the inbox."""
    try:
        os.rename(folders.inbox / arriving.entry, folders.work / arriving.item / arriving.item)
    except FileNotFoundError:
        return False
    return True


def settle(folders: QueueFolders, sidecar: Sidecar, entry: str, fields: dict[str, Any]) -> None:
    """Record a completed arrival in the sidecar: the marker's fields join the item's, the marker goes."""
    sidecar.arrival_settled(fields)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folders.inbox / f"{entry}{READY_SUFFIX}")


def is_still_there(folders: QueueFolders, arriving: ArrivingItem) -> bool | None:
    """Whether the folder being read is still the inbox entry; None when that cannot be told now."""
    try:
        info, held = os.lstat(folders.inbox / arriving.entry), os.fstat(arriving.root_fd)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None  # e.g. permissions changed: look again at the next rescan
    return (info.st_dev, info.st_ino) == (held.st_dev, held.st_ino)


def drop_files(folders: QueueFolders, name: str) -> None:
    """Remove every file of a provisional item: its work folder and its sidecar."""
    folders.remove_item_data(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folders.sidecar_path(name))
    log.info("%s/%s: the bundle left the inbox before its ready marker; the provisional item is dropped",
             folders.name, name)  # fmt: skip


Resumed = tuple[Literal["settled"], str | None] | tuple[Literal["tracked"], ArrivingItem] | tuple[Literal["dropped"]]


def resume(folders: QueueFolders, sidecar: Sidecar, limits: Limits, stop_event: threading.Event) -> Resumed:
    """After a restart, an item that was still arriving is settled (with the marker's rejection, if any),
    tracked again, or dropped."""
    name = sidecar.name
    entry = str(sidecar.doc.get("original_name", name))
    if (folders.work / name / name).exists():
        # Renamed in before the crash; the marker (removed last) still holds the fields.
        fields, rejection = read_marker(folders, entry, limits)
        rejection = rejection or moved_in_rejection(folders, name, limits)
        settle(folders, sidecar, entry, fields)
        return ("settled", rejection)
    try:
        root_fd = os.open(folders.inbox / entry, _OPEN_FLAGS)
    except OSError:
        drop_files(folders, name)
        return ("dropped",)
    return ("tracked", ArrivingItem(entry, name, root_fd, stop_event))
