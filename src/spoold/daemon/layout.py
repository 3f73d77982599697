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
import dataclasses
import errno
import grp
import hashlib
import json
import logging
import os
import pwd
import shutil
import stat
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from spoold.fsio import TEMP_SUFFIX, fsync_dir, remove_tree, write_json_atomic

# Only inbox/ is writable by the spool's group (producers drop there); everything else is the daemon's.
INBOX_MODE = 0o2770
DIR_MODE = 0o2750
# An item's own folder: nobody but the daemon reaches into a claimed item by path.
ITEM_DIR_MODE = 0o700
SUBDIRS = ("inbox", "work", "done", "failed", "status")
# A derived name must leave room for `.json`, a collision suffix `.99999` and a `.part`/`.tmp` within 255 bytes.
MAX_ITEM_BYTES = 240
_EXT_KEPT_BYTES = 16
HANDOFF_FILE = ".handoff.json"
HANDOFF_PREFIX = ".handoff-"

log = logging.getLogger(__name__)


def split_name(name: str) -> tuple[str, str]:
    """`foo.tar.gz` -> (`foo.tar`, `.gz`); `episode_5` -> (`episode_5`, ``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


def fit_name(name: str) -> str:
    """`name`, or when it is longer than MAX_ITEM_BYTES, a shortened form that is still unique to it.

    The stem is cut (on a character boundary) and a hash of the whole name added: `long...~3f9a1c2e.mp4`.
    Names are counted in the bytes the kernel sees (non-UTF-8 names are surrogate-escaped str).
    """
    raw = os.fsencode(name)
    if len(raw) <= MAX_ITEM_BYTES:
        return name
    stem, ext = split_name(name)
    if len(os.fsencode(ext)) > _EXT_KEPT_BYTES:
        stem, ext = name, ""
    tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
    room = MAX_ITEM_BYTES - len(os.fsencode(ext)) - len(tag)
    cut = os.fsencode(stem)[:room]
    while cut:
        try:
            short = os.fsdecode(cut)
            if len(os.fsencode(short)) <= room:
                break
        except UnicodeError:
            pass
        cut = cut[:-1]
    return f"{os.fsdecode(cut)}{tag}{ext}"


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
        # lexists: one lstat a path, where exists() or is_symlink() took two for each name that is free.
        return any(os.path.lexists(p) for p in (
            self.work / item, self.done / item, self.failed / item, self.sidecar_path(item),
        ))  # fmt: skip

    def free_name(self, wanted: str) -> str:
        """`wanted`, or `foo.1.mp4`, `foo.2.mp4`, ... whichever is not in use; call with `lock` held."""
        wanted = fit_name(wanted)
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
            os.mkdir(self.work / name, ITEM_DIR_MODE)
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
        remove_tree(target)
        os.rename(source, target)

    def remove_item_data(self, item: str) -> None:
        for folder in (self.work, self.done, self.failed):
            remove_tree(folder / item)

    def hand_over(self, paths: Iterable[tuple[Path, str]], name: str, record: Mapping[str, Any]) -> str:
        """Make a new item from `paths` (source, relative name) with the handoff `record`.

        Built in a hidden staging folder, then renamed into `work/` in one step;
        `record` (fields, payload, origin) travels inside it until the sidecar is
        written, so a crash at any point leaves either nothing or a whole item.
        """
        stage = self.work / f"{HANDOFF_PREFIX}{uuid.uuid4().hex}"
        os.mkdir(stage, ITEM_DIR_MODE)
        try:
            for source, relative in paths:
                link_or_copy(source, stage / relative)
            write_json_atomic(stage / HANDOFF_FILE, dict(record))
            with self.lock:
                final = self.free_name(name)
                os.rename(stage, self.work / final)
        except BaseException:
            with contextlib.suppress(OSError):
                remove_tree(stage)
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
        """Create missing folders and give existing ones their modes (SPEC section 2).

        `inbox/` is 2770 in the configured group so producers in it can drop; the root and every other
        folder 2750, so producers can read sidecars and health but never change the daemon's state. A
        spool made by an older version (every folder 2770) is tightened here.
        """
        gid = grp.getgrnam(self.group).gr_gid if self.group else -1
        self._make(self.root, DIR_MODE, gid, may_be_link=True)
        for folders in self.queues.values():
            self._make(folders.root, DIR_MODE, gid)
            for sub in SUBDIRS:
                self._make(folders.root / sub, INBOX_MODE if sub == "inbox" else DIR_MODE, gid)

    def tighten_items(self) -> None:
        """Once at start: claimed items of an older version were 2770; make them the daemon's alone."""
        for folders in self.queues.values():
            with os.scandir(folders.work) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & 0o077:
                        os.chmod(entry.path, ITEM_DIR_MODE, follow_symlinks=False)

    def remove_stale_temps(self) -> None:
        """Temp files a crash left beside health.json and metrics.prom."""
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    @staticmethod
    def _make(path: Path, mode: int, gid: int, *, may_be_link: bool = False) -> None:
        """Make `path` a folder of `mode` in group `gid` (-1: any), or accept it when it already is one.

        New folders are made with the permission bits alone: the setgid bit comes from the parent (the
        spool root has it from tmpfiles.d), because systemd's `RestrictSUIDSGID=` refuses a mode that asks
        for it, and `SystemCallFilter=~@privileged` refuses chown. A folder that is already right needs
        neither; one that is wrong and cannot be fixed stops the daemon with the fix in the message.
        """
        try:
            info = os.stat(path) if may_be_link else os.lstat(path)
        except FileNotFoundError:
            path.mkdir(mode & 0o777, parents=True, exist_ok=True)
            info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder (a spool folder must be a real folder)", str(path))
        refused: OSError | None = None
        if gid not in (-1, info.st_gid):
            try:
                os.chown(path, -1, gid)
            except PermissionError as exc:
                refused = exc
        have = stat.S_IMODE(info.st_mode)
        if have != mode:
            try:
                os.chmod(path, mode)
            except PermissionError as exc:
                refused = refused or exc
                if have & 0o777 != mode & 0o777:
                    # Only the permission bits, then: RestrictSUIDSGID= forbids asking for setgid.
                    with contextlib.suppress(PermissionError):
                        os.chmod(path, mode & 0o777)
        if refused is not None:
            _accept_or_explain(path, mode, gid, refused)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def disk_state(self) -> DiskState:
        stats = os.statvfs(self.root)
        # Filesystems without an inode table (btrfs) report 0 files: no inode limit to judge.
        free_inodes = stats.f_favail if stats.f_files else None
        return DiskState(self.free_bytes(), free_inodes, bool(stats.f_flag & os.ST_RDONLY))


# Fewer free inodes than this and an item (its folder, payload, sidecar, manifest) may not fit: pause intake.
MIN_FREE_INODES = 64


@dataclasses.dataclass(frozen=True)
class DiskState:
    """The spool filesystem as the daemon last saw it."""

    free_bytes: int
    free_inodes: int | None
    is_read_only: bool

    def pause_reason(self, min_free_bytes: int) -> str | None:
        """Why intake must pause now (SPEC section 7: below `min_free`; also no inodes, a read-only mount)."""
        if self.is_read_only:
            return "the spool's filesystem is read-only"
        if self.free_bytes < min_free_bytes:
            return f"free space {self.free_bytes} bytes is below min_free {min_free_bytes}"
        if self.free_inodes is not None and self.free_inodes < MIN_FREE_INODES:
            return f"only {self.free_inodes} free inodes"
        return None


class IntakeGate:
    """Whether intake may take more: it pauses while the spool's disk is low, out of inodes or read-only."""

    def __init__(self) -> None:
        self.free_bytes = 0
        self.reason: str | None = None

    @property
    def is_paused(self) -> bool:
        return self.reason is not None

    def check(self, layout: SpoolLayout, min_free_bytes: int) -> bool:
        """Look at the disk now; True when this look paused or resumed intake."""
        disk = layout.disk_state()
        self.free_bytes = disk.free_bytes
        reason = disk.pause_reason(min_free_bytes)
        if reason == self.reason:
            return False
        if reason is not None:
            log.warning("%s: intake paused", reason)
        else:
            log.info("the spool's disk is usable again (%s): intake resumed", self.reason)
        self.reason = reason
        return True


_warned: set[str] = set()


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _accept_or_explain(path: Path, mode: int, gid: int, refused: OSError) -> None:
    """After a refused chown/chmod: go on when the folder works as it is, else say how root fixes it.

    Works means the permission bits are the wanted ones and the group is the configured one; a missing
    setgid bit alone is a warning (files producers drop keep their own group).
    """
    info = os.lstat(path)
    have = stat.S_IMODE(info.st_mode)
    wanted_gid = os.getegid() if gid == -1 else gid
    if have & 0o777 == mode & 0o777 and gid in (-1, info.st_gid):
        if have != mode and str(path) not in _warned:
            _warned.add(str(path))
            log.warning("%s is mode %04o, not %04o (spoold may not set the setgid bit under systemd): give it a "
                        "tmpfiles.d line `d %s %04o %s %s -`", path, have, mode, path, mode,
                        _user_name(), _group_name(wanted_gid))  # fmt: skip
        return
    group = _group_name(wanted_gid)
    raise SpoolFolderError(
        errno.EPERM,
        f"the folder is mode {have:04o} group {_group_name(info.st_gid)} but must be {mode:04o} group {group}, "
        f"and spoold may not change it ({refused.strerror}); as root run `chown {_user_name()}:{group} {path} && "
        f"chmod {mode:04o} {path}`, or add the tmpfiles.d line `d {path} {mode:04o} {_user_name()} {group} -` "
        "and run `systemd-tmpfiles --create`",
        str(path),
    )


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class SpoolFolderError(PermissionError):
    """A spool folder that is not as SPEC section 2 wants it and that spoold may not fix (exit 73)."""
