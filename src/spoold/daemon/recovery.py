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
from collections.abc import Collection

from spoold.daemon import arriving
from spoold.daemon.arriving import ArrivingItem
from spoold.daemon.claiming import adopt_orphan, reject
from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import HANDOFF_FILE, HANDOFF_PREFIX, QueueFolders
from spoold.daemon.sidecar import ACTIVE_STATES, FINISHED_STEP_STATES, GATHER_STEP, Sidecar, error_record

log = logging.getLogger("spoold.recovery")


@dataclasses.dataclass(frozen=True)
class Found:
    """An item found on disk: its sidecar, and for a bundle still arriving, the folder being read."""

    sidecar: Sidecar
    arriving: ArrivingItem | None = None


def recover(config: Config, queue: Queue, folders: QueueFolders, stop_event: threading.Event,
            busy: Collection[str] = ()) -> list[Found]:  # fmt: skip
    """Every item of the queue on disk, made consistent; items in `busy` (running now) are left alone."""
    for name in _listdir(folders.status):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folders.status / name)
    for name in _listdir(folders.work):
        if name.startswith(HANDOFF_PREFIX):
            shutil.rmtree(folders.work / name, ignore_errors=True)
    found: list[Found] = []
    known: set[str] = set(busy)
    for file_name in sorted(_listdir(folders.status)):
        if not file_name.endswith(".json") or file_name.startswith(".") or file_name[:-5] in busy:
            continue
        sidecar = Sidecar.load(folders.status / file_name)
        if sidecar is None:
            log.warning("%s: ignoring unreadable sidecar %s", queue.name, file_name)
            continue
        known.add(sidecar.name)
        try:
            if (item := _resume(queue, folders, sidecar, stop_event)) is not None:
                found.append(item)
        except OSError as exc:
            log.error("%s/%s: cannot resume: %s", queue.name, sidecar.name, exc)
    found.extend(Found(s) for s in pick_up(config, queue, folders, known))
    return found


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
