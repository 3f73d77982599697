"""The spool's folders, and the moves between them: claim, finish, hand over.

```
<spool>/<queue>/inbox/            producers drop items here
<spool>/<queue>/work/<item>/      a claimed item: the payload (named <item>) and what its chain made
<spool>/<queue>/done/<item>/      finished, until retention prunes it
<spool>/<queue>/failed/<item>/    rejected or out of retries
<spool>/<queue>/status/<item>.json
```

Every move is a `rename(2)` inside one filesystem, so an item is always wholly
in one place. A name already in use never overwrites anything: the arrival
becomes `foo.1.mp4`.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from spoold.fsio import fsync_dir, write_json_atomic

DIR_MODE = 0o2770
SUBDIRS = ("inbox", "work", "done", "failed", "status")
HANDOFF_FILE = ".handoff.json"
HANDOFF_PREFIX = ".handoff-"


def split_name(name: str) -> tuple[str, str]:
    """`foo.tar.gz` -> (`foo.tar`, `.gz`); `episode_5` -> (`episode_5`, ``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


class QueueFolders:
    """The folders of one queue, and the lock that makes name reservation race-free in this process."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root / name
        self.inbox = self.root / "inbox"
        self.work = self.root / "work"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        self.status = self.root / "status"
        self.lock = threading.Lock()

    def sidecar_path(self, item: str) -> Path:
        return self.status / f"{item}.json"

    def item_dir(self, item: str, where: str = "work") -> Path:
        folder: Path = getattr(self, where)
        return folder / item

    def is_name_taken(self, item: str) -> bool:
        return any(p.exists() or p.is_symlink() for p in (
            self.work / item, self.done / item, self.failed / item, self.sidecar_path(item),
        ))  # fmt: skip

    def free_name(self, wanted: str) -> str:
        """`wanted`, or `foo.1.mp4`, `foo.2.mp4`, ... whichever is not in use; call with `lock` held."""
        stem, ext = split_name(wanted)
        for n in range(0, 100_000):
            name = wanted if n == 0 else f"{stem}.{n}{ext}"
            if not self.is_name_taken(name):
                return name
        raise OSError(f"no free item name for {wanted!r}")

    def reserve(self, wanted: str) -> str:
        """Create `work/<name>/` for the first free name derived from `wanted`; return the name."""
        with self.lock:
            name = self.free_name(wanted)
            os.mkdir(self.work / name, DIR_MODE)
        return name

    def claim(self, entry: str, item: str | None = None, *, keep_entry_name: bool = False) -> str | None:
        """Move `inbox/<entry>` to `work/<item>/<item>` by rename; None if it vanished first.

        With `keep_entry_name` (requests) the file keeps its name inside the item folder.
        """
        name = self.reserve(item or entry)
        try:
            os.rename(self.inbox / entry, self.work / name / (entry if keep_entry_name else name))
        except FileNotFoundError:
            os.rmdir(self.work / name)
            return None
        return name

    def finish(self, item: str, where: str) -> None:
        """Move a whole item from work/ to done/ or failed/."""
        source = self.work / item
        if not source.exists():
            return
        target = getattr(self, where) / item
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.rename(source, target)

    def remove_item_data(self, item: str) -> None:
        for folder in (self.work, self.done, self.failed):
            path = folder / item
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

    def hand_over(self, paths: Iterable[tuple[Path, str]], name: str, record: Mapping[str, Any]) -> str:
        """Make a new item from `paths` (source, relative name) with the handoff `record`.

        Built in a hidden staging folder, then renamed into `work/` in one step;
        `record` (fields, payload, origin) travels inside it until the sidecar is
        written, so a crash at any point leaves either nothing or a whole item.
        """
        stage = self.work / f"{HANDOFF_PREFIX}{uuid.uuid4().hex}"
        os.mkdir(stage, DIR_MODE)
        try:
            for source, relative in paths:
                link_or_copy(source, stage / relative)
            write_json_atomic(stage / HANDOFF_FILE, dict(record))
            with self.lock:
                final = self.free_name(name)
                os.rename(stage, self.work / final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        fsync_dir(self.work)
        return final


def read_handoff(item_dir: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((item_dir / HANDOFF_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` (a file or a tree) to `target`; copy where links cannot cross filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, copy_function=_link_or_copy_file, symlinks=True)
    else:
        _link_or_copy_file(str(source), str(target))


def _link_or_copy_file(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class SpoolLayout:
    """The spool root and its queues' folders."""

    def __init__(self, root: Path, queue_names: Iterable[str], group: str | None = None) -> None:
        self.root = root
        self.group = group
        self.queues = {name: QueueFolders(root, name) for name in queue_names}

    @property
    def health_path(self) -> Path:
        return self.root / "health.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.prom"

    def ensure(self) -> None:
        """Create missing folders (mode 2770, in the configured group) so producers in that group can write."""
        gid = grp.getgrnam(self.group).gr_gid if self.group else -1
        self._make(self.root, gid)
        for folders in self.queues.values():
            self._make(folders.root, gid)
            for sub in SUBDIRS:
                self._make(folders.root / sub, gid)

    @staticmethod
    def _make(path: Path, gid: int) -> None:
        if path.is_dir():
            return
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)
        if gid != -1:
            with contextlib.suppress(PermissionError):
                os.chown(path, -1, gid)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize
