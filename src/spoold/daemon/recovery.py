"""Resuming after a restart or a crash: the sidecars are the durable record.

Every state a `kill -9` can leave is handled here: a staging folder from an
unfinished hand-over, a claimed folder without a sidecar, a finished item not
yet moved out of work/, a ready marker not yet removed, a sidecar temp file, a
bundle that was still arriving (see `arriving`). The functions return what they
found; the queue's bookkeeping records it. One item's trouble is logged and
skipped, so it cannot keep the others from resuming; the next rescan tries it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Protocol

from spoold.daemon import arriving
from spoold.daemon.arriving import ArrivingItem
from spoold.daemon.claiming import adopt_orphan, reject
from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import HANDOFF_FILE, HANDOFF_PREFIX, QueueFolders
from spoold.daemon.sidecar import ACTIVE_STATES, FINISHED_STEP_STATES, GATHER_STEP, Sidecar, error_record

log = logging.getLogger("spoold.recovery")

# How long one tick of the main loop may spend reading sidecars for a sweep, between its messages.
SLICE_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class Found:
    """An item found on disk: its sidecar, and for a bundle still arriving, the folder being read."""

    sidecar: Sidecar
    arriving: ArrivingItem | None = None
    # Its end was cut short by a crash and finished here (`_finish_interrupted_move`), not by its worker.
    is_cut_short: bool = False


def recover(config: Config, queue: Queue, folders: QueueFolders, stop_event: threading.Event,
            busy: Collection[str] = ()) -> list[Found]:  # fmt: skip
    """Every item in the queue's work/, made consistent; items in `busy` (running now) are left alone.

    Only work/ is read: the sidecars of finished items (a million, in a busy spool) are counted by `tally`, or
    read later by a `StatusSweep` when the last stop was not clean.
    """
    for name in _listdir(folders.work):
        if name.startswith(HANDOFF_PREFIX):
            shutil.rmtree(folders.work / name, ignore_errors=True)
    found: list[Found] = []
    for name in sorted(_listdir(folders.work)):
        if name.startswith(".") or name in busy:
            continue
        try:
            sidecar = Sidecar.load(folders.sidecar_path(name))
            if sidecar is None:
                sidecar = adopt_orphan(config, queue, folders, name)
                if sidecar is not None:
                    log.info("%s/%s: recovered a claimed item without a sidecar", queue.name, name)
                    found.append(Found(sidecar))
            elif (item := _resume(queue, folders, sidecar, stop_event)) is not None:
                found.append(item)
        except OSError as exc:
            log.error("%s/%s: cannot resume: %s", queue.name, name, exc)
    return found


class _Listing(Protocol):
    """What os.scandir returns: entries one by one, and a close."""

    def __iter__(self) -> Iterator[os.DirEntry[str]]: ...

    def close(self) -> None: ...


class StatusSweep:
    """After a stop that was not clean: every sidecar of the queue read once, a slice per call.

    It finds what only the status folder can tell: items that finished while the daemon was down or whose
    end was cut short (moved out of work/ but not yet recorded: `_finish_interrupted_move`), the done and
    failed counts, and temp files of a sidecar write a crash interrupted.
    """

    def __init__(self, queue: Queue, folders: QueueFolders) -> None:
        self.queue = queue
        self.folders = folders
        self.seen = 0
        # A temp file older than the sweep is a crash's leftover; a newer one may be a worker's write under way.
        self._began = time.time()
        self._listing: _Listing | None = None
        try:
            self._listing = os.scandir(folders.status)
        except OSError as exc:
            log.error("cannot list %s: %s", folders.status, exc.strerror)

    def step(self, is_known: Callable[[str], bool], budget_seconds: float = SLICE_SECONDS) -> list[Found] | None:
        """The sidecars read within `budget_seconds`; None once the folder is read to its end."""
        if self._listing is None:
            return None
        found: list[Found] = []
        deadline = time.monotonic() + budget_seconds
        for entry in self._listing:
            self.seen += 1
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < self._began - 0.05:
                        os.unlink(entry.path)
            elif name.endswith(".json") and not name.startswith(".") and not is_known(name[:-5]):
                with contextlib.suppress(OSError):
                    found.extend(self._read(name))
            if self.seen % 64 == 0 and time.monotonic() > deadline:
                return found
        self.close()
        return found

    def _read(self, file_name: str) -> list[Found]:
        sidecar = Sidecar.load(self.folders.status / file_name)
        if sidecar is None:
            log.warning("%s: ignoring unreadable sidecar %s", self.queue.name, file_name)
            return []
        if sidecar.state in ACTIVE_STATES and not (self.folders.work / sidecar.name).is_dir():
            if sidecar.doc.get("step") != GATHER_STEP:  # a member of a `gather:` group ends with its group
                _finish_interrupted_move(self.queue, self.folders, sidecar)
                return [Found(sidecar, is_cut_short=True)]
        elif sidecar.state in ACTIVE_STATES:
            return []  # in work/: recovery found it (or a pick-up will)
        return [Found(sidecar)]

    def close(self) -> None:
        if self._listing is not None:
            self._listing.close()
            self._listing = None

    def __del__(self) -> None:  # a book dropped mid-sweep (a queue gone from the config) lets its listing go
        self.close()


def _resume(queue: Queue, folders: QueueFolders, sidecar: Sidecar, stop_event: threading.Event) -> Found | None:
    name = sidecar.name
    # A kill between writing a handed-over item's sidecar and removing its record leaves the record behind.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(folders.work / name / HANDOFF_FILE)
    if sidecar.state not in ACTIVE_STATES:
        if (folders.work / name).exists():
            settle_finished(queue, folders, sidecar)
        return Found(sidecar)
    if sidecar.is_arriving and (folders.work / name).is_dir():
        resumed = arriving.resume(folders, sidecar, queue.spec.limits, stop_event)
        if resumed[0] == "tracked":
            return Found(sidecar, resumed[1])
        if resumed[0] == "settled" and resumed[1] is not None:
            reject(folders, sidecar, resumed[1])
        return Found(sidecar) if resumed[0] == "settled" else None
    if not (folders.work / name).is_dir():
        if sidecar.doc.get("step") != GATHER_STEP:  # a member of a `gather:` group ends with its group (gather.py)
            _finish_interrupted_move(queue, folders, sidecar)
        return Found(sidecar)
    if sidecar.doc.get("kind") == "bundle":
        original = str(sidecar.doc.get("original_name", name))
        if not os.path.lexists(folders.inbox / original):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folders.inbox / f"{original}.ready")
    return Found(sidecar)


def _finish_interrupted_move(queue: Queue, folders: QueueFolders, sidecar: Sidecar) -> None:
    """An active item whose folder left work/: a crash between moving it out and writing its sidecar."""
    steps = sidecar.doc["steps"]
    if all(s.get("state") in FINISHED_STEP_STATES for s in steps) and (queue.spec.keep.done == "delete" or
                                                         (folders.done / sidecar.name).is_dir()):  # fmt: skip
        sidecar.done()
    elif (folders.failed / sidecar.name).is_dir():
        sidecar.failed(sidecar.current_step_index(), error_record(
            sidecar.doc.get("step"), "interrupted", "the daemon stopped while failing this item; see its log",
            retryable=False))  # fmt: skip
    else:
        sidecar.vanished()


def settle_finished(queue: Queue, folders: QueueFolders, sidecar: Sidecar, state: str | None = None) -> None:
    """Move a finished item out of work/: to failed/, or done/ (its data deleted when the queue keeps none)."""
    if (state or sidecar.state) == "failed":
        folders.finish(sidecar.name, "failed")
    elif queue.spec.keep.done != "delete":
        folders.finish(sidecar.name, "done")
    else:
        folders.remove_item_data(sidecar.name)


def pick_up(config: Config, queue: Queue, folders: QueueFolders, known: Collection[str]) -> list[Sidecar]:
    """Items in work/ that the daemon does not hold (`spoold retry`, a hand-over, a move that failed before).

    Returns the ones to run; finished ones still in work/ are moved where they belong.
    """
    sidecars: list[Sidecar] = []
    for name in sorted(_listdir(folders.work)):
        if name.startswith(".") or name in known:
            continue
        try:
            sidecar = Sidecar.load(folders.sidecar_path(name))
            if sidecar is None:
                sidecar = adopt_orphan(config, queue, folders, name)
                if sidecar is None:
                    continue
                log.info("%s/%s: recovered a claimed item without a sidecar", queue.name, name)
            elif sidecar.state not in ACTIVE_STATES:
                settle_finished(queue, folders, sidecar)
                continue
            else:
                log.info("%s/%s: picked up from work/", queue.name, name)
            sidecars.append(sidecar)
        except OSError as exc:
            log.error("%s/%s: cannot pick up from work/: %s", queue.name, name, exc)
    return sidecars


def _listdir(folder: os.PathLike[str]) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError) as exc:
        log.error("cannot list %s: %s", folder, exc.strerror)
        return []
