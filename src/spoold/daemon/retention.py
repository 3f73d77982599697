"""Retention: prune finished items once `keep` says they are old enough."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from spoold.daemon.config import Queue
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar, parse_iso

log = logging.getLogger("spoold.retention")


def prune(queue: Queue, folders: QueueFolders, forget: Callable[[str], None]) -> int:
    """Remove data and sidecars of done/failed items past their keep period; return how many went."""
    now = time.time()
    removed = 0
    keep = queue.spec.keep
    # Nothing is due before the shortest keep period: a sidecar written more recently than that is not even
    # read (its mtime is its last write), so a rescan of a large status folder costs a stat per file.
    youngest_due = min(0.0 if k == "delete" else float(k) for k in (keep.done, keep.failed))
    with os.scandir(folders.status) as entries:
        names = [e.name for e in entries if e.name.endswith(".json") and not e.name.startswith(".")
                 and now - e.stat(follow_symlinks=False).st_mtime >= youngest_due]  # fmt: skip
    for file_name in names:
        sidecar = Sidecar.load(folders.status / file_name)
        if sidecar is None or sidecar.state not in ("done", "failed"):
            continue
        finished = parse_iso(sidecar.doc.get("updated")) or now
        period = keep.done if sidecar.state == "done" else keep.failed
        keep_data = 0.0 if period == "delete" else float(period)
        age = now - finished
        if age >= keep_data:
            folders.remove_item_data(sidecar.name)
        if age >= max(keep_data, float(keep.status)):
            sidecar.remove()
            forget(sidecar.name)
            removed += 1
    if removed:
        log.info("%s: pruned %d finished items", queue.name, removed)
    return removed
