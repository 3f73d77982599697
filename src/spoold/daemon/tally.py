"""Finished items are counted, not kept: a million done sidecars cost two integers, not a million names.

The counts of a queue's done and failed items come from one of two places at start:
- the record a clean stop leaves in health.json (`stopped`): the counts then, and the status folder's
  mtime after the last sidecar write. When the folder's mtime is the same at the next start (no sidecar
  written, replaced or removed since: `spoold retry`, a crash's leftovers, a hand edit all change it) and
  work/ holds as many unfinished items as the record says, the counts are taken as they stand;
- otherwise a sweep (recovery.StatusSweep) reads every sidecar once, 50 ms per loop tick, after the daemon is
  ready: the counts grow to their true value meanwhile, and retention waits for the sweep to end.
Items that finish while the daemon runs are added as they finish. The last few thousand finished names are
remembered, so an item recorded twice in a row (found by a rescan as well as by its worker) counts once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spoold.fsio import now_iso, read_json

log = logging.getLogger("spoold")

FINISHED = ("done", "failed")
RECENT = 4096


class Tally:
    """The done and failed counts of one queue."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(FINISHED, 0)
        self._recent: OrderedDict[str, str] = OrderedDict()
        # While a sweep runs: every name counted live, which the sweep must not count again.
        self.counted_live: set[str] | None = None

    def seed(self, counts: dict[str, int]) -> None:
        for state in FINISHED:
            self.counts[state] += counts.get(state, 0)

    def record(self, item: str, state: str, *, is_live: bool = True) -> None:
        """`item` finished in `state`; `is_live`: just now (not read by start-up or the sweep)."""
        if state not in FINISHED:
            return  # a sidecar that says neither (edited by hand): not an item that finished
        if not is_live:
            self.counts[state] += 1
            return
        previous = self._recent.get(item)
        if previous == state:
            return
        if previous is not None:
            self._take(previous)
        self._recent[item] = state
        self._recent.move_to_end(item)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        self.counts[state] += 1
        if self.counted_live is not None:
            self.counted_live.add(item)

    def forget(self, item: str, state: str) -> None:
        """A finished item's sidecar is gone (retention), or it runs again (`spoold retry`)."""
        self._recent.pop(item, None)
        self._take(state)

    def _take(self, state: str) -> None:
        self.counts[state] = max(0, self.counts[state] - 1)


class ItemStates:
    """Each unfinished item's state by name, and the finished ones counted: one owner for both."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self.tally = Tally()

    def get(self, item: str) -> str | None:
        return self.active.get(item)

    def __contains__(self, item: object) -> bool:
        return item in self.active

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.active))

    def set(self, item: str, state: str, *, is_live: bool = True, is_counted: bool = True) -> None:
        self.drop(item)
        if state in FINISHED:
            if is_counted:
                self.tally.record(item, state, is_live=is_live)
            return
        self.active[item] = state
        self._counts[state] = self._counts.get(state, 0) + 1

    def drop(self, item: str) -> None:
        state = self.active.pop(item, None)
        if state is not None:
            self._counts[state] -= 1

    def forget_finished(self, item: str, state: str) -> None:
        """A finished item's sidecar is gone (retention), or it runs again (`spoold retry`)."""
        self.tally.forget(item, state)

    def counts(self) -> dict[str, int]:
        return {state: n for state, n in [*self._counts.items(), *self.tally.counts.items()] if n}

    def start_counting(self, stop: StopRecord | None, status_mtime_ns: int | None, unfinished: int) -> bool:
        """Count the finished items from a clean stop's record when it still holds; True when a sweep must."""
        self.tally = Tally()
        if stop is not None and stop.status_mtime_ns == status_mtime_ns and stop.unfinished == unfinished:
            self.tally.seed(stop.counts)
            return False
        self.tally.counted_live = set()
        return True

    def is_known(self, item: str) -> bool:
        """Whether a sweep must pass `item` by: unfinished, or counted already since the sweep began."""
        return item in self.active or item in (self.tally.counted_live or ())

    def sweep_ended(self, queue: str) -> None:
        """Every sidecar was read: the counts are whole, and names counted since need no keeping."""
        self.tally.counted_live = None
        if any(self.tally.counts.values()):
            log.info("%s: counted the finished items: %s", queue, self.tally.counts)

    def requeued(self, item: str, from_state: object) -> None:
        """`spoold retry` while the daemon runs: a finished item has work again."""
        if isinstance(from_state, str) and from_state in FINISHED and item not in self.active:
            self.tally.forget(item, from_state)


@dataclasses.dataclass(frozen=True)
class StopRecord:
    """What a clean stop left for one queue (see the module's note)."""

    counts: dict[str, int]
    status_mtime_ns: int

    @property
    def unfinished(self) -> int:
        return sum(n for state, n in self.counts.items() if state not in FINISHED)


def _parse_stop(health: dict[str, Any], queue: str) -> StopRecord | None:
    """The queue's record in a health.json written at a clean stop, if it is whole; health.json is read,
    not trusted, and anything odd means a sweep."""
    stopped = health.get("stopped")
    counts = health.get("queues", {}).get(queue) if isinstance(health.get("queues"), dict) else None
    if not isinstance(stopped, dict) or not isinstance(counts, dict):
        return None
    mtimes = stopped.get("status_mtime_ns")
    mtime = mtimes.get(queue) if isinstance(mtimes, dict) else None
    if not isinstance(mtime, int) or not all(isinstance(k, str) and _is_count(v) for k, v in counts.items()):
        return None
    return StopRecord(dict(counts), mtime)


def read_stop_records(health_path: Path) -> dict[str, StopRecord]:
    health = read_json(health_path) or {}
    queues = health.get("queues")
    names = [q for q in queues if isinstance(q, str)] if isinstance(queues, dict) else []
    return {q: record for q in names if (record := _parse_stop(health, q)) is not None}


def stop_record(status_folders: dict[str, Path]) -> dict[str, Any]:
    """health.json's `stopped`, written once every worker has ended: read back by `read_stop_records`."""
    mtimes = {queue: status_mtime_ns(folder) for queue, folder in status_folders.items()}
    return {"at": now_iso(), "status_mtime_ns": {queue: n for queue, n in mtimes.items() if n is not None}}


def status_mtime_ns(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
