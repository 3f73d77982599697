"""Retention: prune finished items once `keep` says they are old enough.

An item's age is what the wall clock says (its sidecar's `updated`), but never more than the time this
daemon has watched it on the monotonic clock since it first saw the sidecar (then its wall-clock age): a
clock stepped forward (NTP correcting a Pi that booted without a real-time clock, +1 year) would otherwise
make every done item look a year old and delete them all at once. A sidecar dated in the future (the clock
stepped back) ages on the monotonic clock alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from spoold.daemon.config import Queue
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar, parse_iso

log = logging.getLogger("spoold.retention")

# status folder -> sidecar file name -> (its mtime_ns, time.monotonic() minus its age when first seen so).
_origins: dict[Path, dict[str, tuple[int, float]]] = {}


def prune(queue: Queue, folders: QueueFolders, forget: Callable[[str], None]) -> int:
    """Remove data and sidecars of done/failed items past their keep period; return how many went."""
    now, mono = time.time(), time.monotonic()
    removed = 0
    keep = queue.spec.keep
    # Nothing is due before the shortest keep period: a sidecar written more recently than that is not even
    # read (its mtime is its last write), so a rescan of a large status folder costs a stat per file.
    youngest_due = min(0.0 if k == "delete" else float(k) for k in (keep.done, keep.failed))
    known = _origins.get(folders.status, {})
    seen: dict[str, tuple[int, float]] = {}
    names = []
    with os.scandir(folders.status) as entries:
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
            origin = known.get(entry.name)
            if origin is None or origin[0] != mtime_ns:  # first seen, or rewritten since
                origin = (mtime_ns, mono - max(now - mtime_ns / 1e9, 0.0))
            seen[entry.name] = origin
            if _age(now - mtime_ns / 1e9, mono - origin[1]) >= youngest_due:
                names.append(entry.name)
    _origins[folders.status] = seen
    for file_name in names:
        sidecar = Sidecar.load(folders.status / file_name)
        if sidecar is None or sidecar.state not in ("done", "failed"):
            continue
        finished = parse_iso(sidecar.doc.get("updated")) or now
        period = keep.done if sidecar.state == "done" else keep.failed
        keep_data = 0.0 if period == "delete" else float(period)
        age = _age(now - finished, mono - seen[file_name][1])
        if age >= keep_data:
            folders.remove_item_data(sidecar.name)
        if age >= max(keep_data, float(keep.status)):
            sidecar.remove()
            forget(sidecar.name)
            removed += 1
    if removed:
        log.info("%s: pruned %d finished items", queue.name, removed)
    return removed


def _age(wall_age: float, watched: float) -> float:
    """The age to judge by: the wall clock's, capped by how long this daemon watched (see the module doc)."""
    return watched if wall_age < 0 else min(wall_age, watched)
