"""What a producer's item may contain, checked once it is claimed: regular files and folders, nothing else.

A claimed item is walked through directory descriptors (no path is followed
twice, no symlink ever), within the queue's `limits` on depth and entry count.
Anything else anywhere inside it (a symlink, a FIFO, a socket, a device), a
file its dropper could not read (a hard link to a root-only file), or a tree
beyond the limits rejects the item, naming the path. When the daemon runs as
root it takes the item over (owner root, no group or other write), so its
dropper cannot reach into it by path after the claim. Inodes shared with other
paths (hard links) are never changed: a hard link to another user's file
rejects the item. A descriptor the producer opened before the claim cannot be
revoked; shipping verifies the destination against the checksum, so content
changed that way fails verification rather than going out unnoticed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

from spoold.daemon.config import Limits
from spoold.fsio import describe_type

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_BITS = stat.S_IWGRP | stat.S_IWOTH


class Rejected(Exception):
    """Raised with the reason an item cannot be accepted."""


def check_item(top: Path, limits: Limits) -> str | None:
    """Check (and, as root, take over) the claimed entry `top`; the rejection reason, or None."""
    try:
        _check(top, limits, take_over=os.geteuid() == 0)
    except Rejected as exc:
        return str(exc)
    return None


def _check(top: Path, limits: Limits, *, take_over: bool) -> None:
    fd = os.open(top, _FILE_FLAGS)
    try:
        info = os.fstat(fd)
        owner = info.st_uid
        if stat.S_ISREG(info.st_mode):
            if info.st_nlink > 1 and owner in (0, os.geteuid()) and not info.st_mode & stat.S_IROTH:
                raise Rejected("it is a hard link to a file that only its owner may read")
            _take_over(fd, info, take_over and info.st_nlink == 1)
            return
        if not stat.S_ISDIR(info.st_mode):
            raise Rejected(f"{describe_type(info.st_mode)} is never followed or read")
        _take_over(fd, info, take_over)
        _walk(fd, owner, limits, take_over)
    finally:
        os.close(fd)


def _walk(root_fd: int, owner: int, limits: Limits, take_over: bool) -> None:
    """Depth first with one open descriptor per level, so descriptors stay bounded by `limits.depth`."""
    count = 0
    stack: list[tuple[int, Iterator[os.DirEntry[str]], str]] = [(root_fd, _entries(root_fd), "")]
    try:
        while stack:
            fd, entries, where = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                if fd != root_fd:
                    os.close(fd)
                continue
            path = f"{where}{entry.name}"
            count += 1
            if count > limits.files:
                raise Rejected(f"it holds more than {limits.files} entries (limits.files)")
            info = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if len(stack) >= limits.depth:
                    raise Rejected(f"{path} is nested deeper than {limits.depth} levels (limits.depth)")
                child = _open_same(fd, entry.name, info, _DIR_FLAGS, path)
                stack.append((child, _entries(child), f"{path}/"))
                _require_readable(owner, info, path, stat.S_IRUSR | stat.S_IXUSR)
                _take_over(child, info, take_over)
            elif stat.S_ISREG(info.st_mode):
                _require_readable(owner, info, path, stat.S_IRUSR)
                if info.st_nlink > 1 and info.st_uid != owner and owner not in (0, os.geteuid()):
                    raise Rejected(f"{path} is a hard link to a file of another user (uid {info.st_uid})")
                if take_over and info.st_nlink == 1:
                    file_fd = _open_same(fd, entry.name, info, _FILE_FLAGS, path)
                    try:
                        _take_over(file_fd, info, take_over)
                    finally:
                        os.close(file_fd)
            else:
                raise Rejected(f"{path} is {describe_type(info.st_mode)}; only regular files and folders are "
                               "accepted inside an item")  # fmt: skip
    finally:
        for fd, _, _ in stack:
            if fd != root_fd:
                os.close(fd)


def _entries(fd: int) -> Iterator[os.DirEntry[str]]:
    # scandir on a descriptor leaves it open; sorted so the first problem named is the same every time.
    with os.scandir(fd) as scan:
        yield from sorted(scan, key=lambda e: e.name)


def _open_same(dir_fd: int, name: str, info: os.stat_result, flags: int, path: str) -> int:
    """Open `name` and make sure it is still the entry that was checked (not swapped meanwhile)."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise Rejected(f"{path} cannot be opened: {exc.strerror}") from None
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
        os.close(fd)
        raise Rejected(f"{path} changed while it was checked")
    return fd


def _require_readable(owner: int, info: os.stat_result, path: str, user_bits: int) -> None:
    """The daemon must never read on a producer's behalf what the producer could not read itself."""
    if owner == 0 or owner == os.geteuid():
        return
    shift = 0 if info.st_uid == owner else 3 if info.st_gid in _groups_of(owner) else 6
    wanted = user_bits >> shift
    if info.st_mode & wanted != wanted:
        raise Rejected(f"{path} is not readable by the item's owner (uid {owner})")


@functools.lru_cache(maxsize=256)
def _groups_of(uid: int) -> frozenset[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(user.pw_name, user.pw_gid))


def _take_over(fd: int, info: os.stat_result, take_over: bool) -> None:
    if not take_over:
        return
    with contextlib.suppress(PermissionError):
        if info.st_uid != 0:
            os.fchown(fd, 0, -1)
        if info.st_mode & _WRITE_BITS or not info.st_mode & stat.S_IRUSR:
            os.fchmod(fd, (stat.S_IMODE(info.st_mode) & ~_WRITE_BITS) | stat.S_IRUSR)


def tree_signature(path: Path, limits: Limits) -> tuple[int, int, int]:
    """(entries, bytes, newest mtime) of a folder still in the inbox, to see whether it has settled.

    Iterative and bounded: a tree beyond `limits` raises `Rejected` rather than being walked to the end.
    """
    count, total, newest = 0, 0, os.lstat(path).st_mtime_ns
    stack = [(path, 1)]
    while stack:
        folder, depth = stack.pop()
        try:
            scan = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in scan:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            count += 1
            if count > limits.files:
                raise Rejected(f"it holds more than {limits.files} entries (limits.files)")
            total += info.st_size
            newest = max(newest, info.st_mtime_ns)
            if stat.S_ISDIR(info.st_mode):
                if depth >= limits.depth:
                    raise Rejected(f"{os.path.relpath(entry.path, path)} is nested deeper than {limits.depth} "
                                   "levels (limits.depth)")  # fmt: skip
                stack.append((Path(entry.path), depth + 1))
    return (count, total, newest)
