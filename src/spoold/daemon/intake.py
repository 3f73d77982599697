"""Deciding when an inbox entry is complete.

A file is complete once its size and mtime stay unchanged for `settle` seconds
after the last event (close-after-write, moved-in) or after a scan found it. A
bundle is complete when `<name>.ready` appears beside it, or, with
`ready: settle`, after `settle` seconds without change anywhere inside it. In
a queue whose first step starts early, a bundle's folder is reported as soon
as it appears (`Arrival.is_early`), and again when its marker arrives.
Events only accelerate: a scan finds anything they missed, and since a claim
moves the entry out of the inbox, nothing is ever claimed twice.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import fnmatch
import heapq
import itertools
import os
import stat
from pathlib import Path

from spoold.daemon.config import Limits, Queue
from spoold.daemon.trees import Rejected, tree_signature
from spoold.fsio import describe_type

READY_SUFFIX = ".ready"
CLAIMS_PER_TICK = 256
# Inbox entries tracked at once. Beyond this a burst waits in the inbox untracked (100,000 candidates held
# ~28 MB) and is read from a listing once those tracked are claimed. Whatever a burst holds at once stays
# resident after it (the allocator keeps an arena while any object in it lives): 4,096 left the daemon
# 2 MiB larger once idle than 1,024, at the same items/s.
MAX_CANDIDATES = 1024
Signature = tuple[int, int, int]


@dataclasses.dataclass(slots=True)  # one per inbox entry not yet claimed: a burst of 100,000 holds as many
class Candidate:
    signature: Signature | None
    deadline: float
    # A close-after-write or move event named this file: complete after `settle` even if a descriptor stays
    # open (SPEC 3). A file only a scan found must also be open for writing nowhere.
    is_announced: bool = False


@dataclasses.dataclass(frozen=True)
class Arrival:
    """An inbox entry that is complete and may be claimed."""

    entry: str
    marker: str | None = None
    rejection: str | None = None
    # A bundle folder without its marker yet, in a queue whose first step starts early.
    is_early: bool = False


class Intake:
    """Tracks one queue's inbox entries until each is complete."""

    def __init__(self, queue: Queue, inbox: Path) -> None:
        self.queue = queue
        self.inbox = inbox
        self.settle_seconds = float(queue.spec.settle)
        self.candidates: dict[str, Candidate] = {}
        # (deadline, order, name) of every candidate, and stale ones (the candidate is gone or its deadline moved)
        # that are dropped when they come up: the loop asks for the next deadline after every wake.
        self._deadlines: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        # Entries already reported early, still arriving: only their marker matters now.
        self.receiving: set[str] = set()
        self.is_overflowing = False  # entries were left untracked (MAX_CANDIDATES): list the inbox when room

    def reconfigure(self, queue: Queue) -> None:
        self.queue = queue
        self.settle_seconds = float(queue.spec.settle)

    def is_ignored(self, name: str) -> bool:
        return name.startswith(".") or any(fnmatch.fnmatchcase(name, p) for p in self.queue.spec.ignore)

    def notice(self, path: Path, now: float, is_landed: bool = False) -> None:
        """An event touched `path` (anywhere below the inbox): look at its top-level entry soon.

        `is_landed`: the event was close-after-write or a move, which announces a top-level file as written."""
        try:
            relative = path.relative_to(self.inbox)
        except ValueError:
            return
        if not relative.parts:
            return
        # Without IN_CREATE in the watch (server._watch), any event for a top-level file is a close-after-write
        # or a move in (watchdog reports a move whose IN_MOVED_FROM it never saw as a created event).
        sees_creates = self.queue.starts_early or (self.queue.spec.items == "bundles"
                                                   and self.queue.spec.ready == "settle")  # fmt: skip
        self._track(relative.parts[0], now, is_announced=len(relative.parts) == 1 and (is_landed or not sees_creates))

    def scan(self, now: float) -> None:
        """Look at every entry of the inbox (start, period, overflow)."""
        try:
            entries = os.scandir(self.inbox)
        except FileNotFoundError:
            return
        # Read an entry at a time, not listed whole: the names of a 100,000-entry inbox took 7 MB at each
        # refill, and the few kept as candidates held that memory in scattered pieces long after the burst.
        with entries:
            for entry in entries:
                if len(self.candidates) >= MAX_CANDIDATES:
                    self.is_overflowing = True  # the rest when there is room: a burst is not walked once per refill
                    break
                if entry.name not in self.candidates:
                    self._track(entry.name, now)

    def _track(self, name: str, now: float, is_announced: bool = False) -> None:
        if self.is_ignored(name):
            return
        is_marker = name.endswith(READY_SUFFIX) and len(name) > len(READY_SUFFIX)
        if len(self.candidates) >= MAX_CANDIDATES and not (is_marker and name[: -len(READY_SUFFIX)] in self.receiving):
            self.is_overflowing = True
            return
        if is_marker:
            # A marker makes its item ready at once: look at the item, not the marker.
            self._set(name[: -len(READY_SUFFIX)], Candidate(None, now))
            return
        if name in self.receiving:
            return
        signature = None
        delay = self.settle_seconds
        try:
            info = os.lstat(self.inbox / name)
            if stat.S_ISREG(info.st_mode):
                # Recorded now, so an untouched file is claimed one settle period after its event.
                signature = (1, info.st_size, info.st_mtime_ns)
            elif stat.S_ISDIR(info.st_mode) and self.queue.starts_early:
                delay = 0.0
        except FileNotFoundError:
            return
        self._set(name, Candidate(signature, now + delay, is_announced))

    def _set(self, name: str, candidate: Candidate) -> None:
        self.candidates[name] = candidate
        self._schedule(name, candidate)

    def _schedule(self, name: str, candidate: Candidate) -> None:
        heapq.heappush(self._deadlines, (candidate.deadline, next(self._order), name))
        if len(self._deadlines) > 4 * len(self.candidates) + 64:  # mostly stale (a folder's many events)
            self._deadlines = [(c.deadline, next(self._order), n) for n, c in self.candidates.items()]
            heapq.heapify(self._deadlines)

    def _is_current(self, entry: tuple[float, int, str]) -> bool:
        candidate = self.candidates.get(entry[2])
        return candidate is not None and candidate.deadline == entry[0]

    def next_deadline(self) -> float | None:
        while self._deadlines and not self._is_current(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def due(self, now: float, limit: int = CLAIMS_PER_TICK) -> list[Arrival]:
        """Entries whose deadline passed and that are complete now, at most `limit`; the rest stay due.

        A claim costs a few durable writes: claiming a burst of 100,000 in one tick would hold the loop (and
        its watchdog ping) for minutes. The loop comes back at once for the rest, between its messages.
        """
        arrivals: list[Arrival] = []
        if limit <= 0:
            return arrivals
        checked: list[str] = []
        try:
            while len(arrivals) < limit and (at := self.next_deadline()) is not None and at <= now:
                name = heapq.heappop(self._deadlines)[2]
                checked.append(name)
                arrival = self._check(name, self.candidates[name], now)
                if arrival is not None:
                    arrivals.append(arrival)
                    del self.candidates[name]
        finally:
            for name in checked:  # not complete yet (or the check raised): due again at its deadline
                if (candidate := self.candidates.get(name)) is not None:
                    self._schedule(name, candidate)
        if self.is_overflowing and len(self.candidates) < MAX_CANDIDATES // 2:
            self.is_overflowing = False
            self.scan(now)  # the rest of a burst, now that there is room
        return arrivals

    def _check(self, name: str, candidate: Candidate, now: float) -> Arrival | None:
        path = self.inbox / name
        marker = name + READY_SUFFIX
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            del self.candidates[name]
            return None
        has_marker = os.path.lexists(self.inbox / marker)
        if stat.S_ISLNK(info.st_mode) or not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            return Arrival(name, rejection=f"{describe_type(info.st_mode)} is never followed or read; only regular "
                                           "files and folders are accepted")
        items = self.queue.spec.items
        if stat.S_ISDIR(info.st_mode):
            if items == "files":
                return Arrival(name, rejection="a folder was dropped into a queue of files (items: files); "
                                               "use items: bundles to accept folders")
            if items == "requests":
                return Arrival(name, rejection="a folder was dropped into a queue of requests (items: requests)")
            if self.queue.spec.ready == "marker":
                if has_marker:
                    return Arrival(name, marker=marker)
                if self.queue.starts_early and name not in self.receiving:
                    return Arrival(name, is_early=True)
                del self.candidates[name]  # waits for its marker's event or a scan
                return None
        elif has_marker:
            return Arrival(name, marker=marker)
        elif items == "requests" and not name.endswith(".json"):
            return Arrival(name, rejection="a queue of requests (items: requests) takes only .json request files")
        try:
            signature = _signature(path, info, self.queue.spec.limits)
        except Rejected as exc:
            return Arrival(name, rejection=str(exc))
        if signature != candidate.signature or (stat.S_ISREG(info.st_mode) and not candidate.is_announced
                                                and is_open_for_writing(path)):  # fmt: skip
            candidate.signature = signature
            candidate.deadline = now + self.settle_seconds
            return None
        return Arrival(name)


def is_open_for_writing(path: Path) -> bool:
    """Whether some process holds `path` open for writing (a producer pausing longer than `settle`).

    A scan finds files no close event announced, and a quiet size and mtime do not say the writer is done.
    The kernel refuses a read lease on a file open for writing anywhere (EAGAIN); the lease is dropped at
    once. Where leases cannot be taken (not the file's owner without CAP_LEASE, a filesystem without
    leases) this says False, and settling alone decides, as before.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _signature(path: Path, info: os.stat_result, limits: Limits) -> Signature:
    if not stat.S_ISDIR(info.st_mode):
        return (1, info.st_size, info.st_mtime_ns)
    return tree_signature(path, limits)


