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
    for file_name in os.listdir(folders.status):
        if not file_name.endswith(".json") or file_name.startswith("."):
            continue
        sidecar = Sidecar.load(folders.status / file_name)
        if sidecar is None or sidecar.state not in ("done", "failed"):
            continue
        finished = parse_iso(sidecar.doc.get("updated")) or now
        keep = queue.spec.keep.done if sidecar.state == "done" else queue.spec.keep.failed
        keep_data = 0.0 if keep == "delete" else float(keep)
        age = now - finished
        if age >= keep_data:
            folders.remove_item_data(sidecar.name)
        if age >= max(keep_data, float(queue.spec.keep.status)):
            sidecar.remove()
            forget(sidecar.name)
            removed += 1
    if removed:
        log.info("%s: pruned %d finished items", queue.name, removed)
    return removed
