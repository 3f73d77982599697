"""Retention: prune finished items once `keep` says they are old enough.

An item's age is judged on the wall clock as it stood when the item was last written: `WallClock` keeps
the steps of the wall clock this daemon has seen (wall minus monotonic, sampled every tick), so a clock
stepped forward (NTP correcting a Pi that booted without a real-time clock, +1 year) does not make every
done item look a year old and delete them all at once, and a clock stepped back does not keep them for a
year. That record grows with the number of steps, not of items. A sidecar dated after now (written before
a backward step this daemon did not see) ages on the monotonic clock from when it was first seen.

A large status folder is read a slice at a time: each rescan goes on where the previous one stopped,
so a rescan costs at most `SLICE` stats however many sidecars there are, and only sidecars old enough by
their mtime to be due are opened.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from spoold.daemon.config import Queue
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar, parse_iso

log = logging.getLogger("spoold.retention")

# A change of wall minus monotonic beyond this between two samples is a step of the wall clock, not jitter.
STEP_SECONDS = 2.0
MAX_STEPS = 64
SLICE = 20_000


class WallClock:
    """The wall clock's offsets from the monotonic clock, one per stretch between the steps seen."""

    def __init__(self) -> None:
        self.stretches: list[tuple[float, float]] = []  # (monotonic start, wall minus monotonic), oldest first

    def sample(self) -> None:
        offset = time.time() - time.monotonic()
        if not self.stretches or abs(offset - self.stretches[-1][1]) > STEP_SECONDS:
            self.stretches.append((time.monotonic(), offset))
            del self.stretches[1:-MAX_STEPS]  # the first stretch judges everything written before it

    def age(self, wall: float) -> float | None:
        """Seconds since the wall-clock time `wall` was current; None for a time this clock never showed yet."""
        mono = time.monotonic()
        for start, offset in reversed(self.stretches):
            if wall >= start + offset:
                break  # written while this stretch's offset held (or later)
        else:
            offset = self.stretches[0][1]  # before this daemon watched: trust the clock as it first stood
        age = mono - (wall - offset)
        return age if age >= 0 else None


class Pruner:
    """One queue's retention: a cursor through its status folder, and the first sight of future-dated sidecars."""

    def __init__(self, folders: QueueFolders, forget: Callable[[str, str], None],
                 may_prune: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
        self.folders = folders
        self.forget = forget  # (item, its state): its sidecar is gone
        # False while the queue's finished items are still being counted (recovery.StatusSweep).
        self.may_prune = may_prune
        self._cursor: Iterator[os.DirEntry[str]] | None = None
        # Sidecar file name -> monotonic time when first seen, for those dated after now (rare: a clock step).
        self._future: dict[str, float] = {}

    def prune(self, queue: Queue, clock: WallClock) -> int:
        """Remove data and sidecars of done/failed items past their keep period; return how many went."""
        if not self.may_prune():
            return 0
        keep = queue.spec.keep
        clock.sample()  # once per rescan, not per sidecar: a step in between is seen at the next tick
        # Nothing is due before the shortest keep period: a sidecar written more recently than that is not even
        # read (its mtime is its last write), so a rescan costs a stat per file of its slice.
        youngest_due = min(0.0 if k == "delete" else float(k) for k in (keep.done, keep.failed))
        due = [entry.name for entry in self._slice() if self._age(entry.name, _mtime(entry), clock) >= youngest_due]
        removed = 0
        for file_name in due:
            sidecar = Sidecar.load(self.folders.status / file_name)
            if sidecar is None or sidecar.state not in ("done", "failed"):
                continue
            finished = parse_iso(sidecar.doc.get("updated")) or time.time()
            period = keep.done if sidecar.state == "done" else keep.failed
            keep_data = 0.0 if period == "delete" else float(period)
            age = self._age(file_name, finished, clock)
            if age >= keep_data:
                self.folders.remove_item_data(sidecar.name)
            if age >= max(keep_data, float(keep.status)):
                sidecar.remove()
                self.forget(sidecar.name, sidecar.state)
                self._future.pop(file_name, None)
                removed += 1
        if removed:
            log.info("%s: pruned %d finished items", queue.name, removed)
        return removed

    def _slice(self) -> Iterator[os.DirEntry[str]]:
        """The next sidecars of the status folder, at most SLICE, going on from the previous call.

        Yielded one by one: 20,000 entries with their cached stats held at once were ~8 MB of peak memory.
        """
        if self._cursor is None:
            self._cursor = _sidecar_entries(self.folders)
        for count, entry in enumerate(self._cursor, 1):
            yield entry
            if count >= SLICE:
                return  # the next rescan goes on from here
        self._cursor = None  # read to its end: the next rescan starts again

    def _age(self, file_name: str, wall: float, clock: WallClock) -> float:
        age = clock.age(wall)
        if age is not None:
            return age
        first = self._future.setdefault(file_name, time.monotonic())
        return time.monotonic() - first


def _sidecar_entries(folders: QueueFolders) -> Iterator[os.DirEntry[str]]:
    with os.scandir(folders.status) as entries:
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                yield entry


def _mtime(entry: os.DirEntry[Any]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return time.time()  # gone meanwhile: not due
