"""Durable file primitives shared by the daemon, handlers and transports.

A durable replace writes a temp file in the same folder, fsyncs it, renames it
over the target and fsyncs the folder, so a reader sees the old or the new
file and a crash never loses the last state written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FILE_MODE = 0o640
# Temp files are named by the writer, never by the target: a 250-byte item name still leaves a short,
# unique temp name, and O_EXCL | O_NOFOLLOW never writes through something planted at that name.
TEMP_SUFFIX = ".tmp"
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeFile(ValueError):
    """Raised when a file to be read is not a regular file or is larger than its bound."""


def now_iso(ts: float | None = None) -> str:
    """UTC time as `2026-11-21T10:00:01.120Z`."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except (TypeError, ValueError):
        return None


def write_bytes_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` durably; readers see the old or the new file, never a mix.

    On any error (a full disk, a read-only remount) the old file stays as it was and the temp file goes.
    """
    tmp = path.with_name(f".{secrets.token_hex(8)}{TEMP_SUFFIX}")
    fd = os.open(tmp, _CREATE_FLAGS, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def encode_json(document: object, *, indent: int | None = 2) -> bytes:
    """UTF-8 JSON ending in a newline. Text from names that are not UTF-8 (Python's lone surrogates) is
    written as JSON `\\udcXX` escapes, which read back to the same str: kept reversibly, never a crash."""
    text = json.dumps(document, indent=indent, ensure_ascii=False, default=str)
    return text.encode("utf-8", "backslashreplace") + b"\n"


def write_json_atomic(path: Path, document: dict[str, Any], mode: int = FILE_MODE) -> None:
    write_bytes_atomic(path, encode_json(document), mode)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_written(paths: Iterable[Path]) -> None:
    """Make the files a step wrote durable (a folder: every file in it) and the folders that name them.

    Called before a sidecar records the step done: without it a power cut can leave the step done on disk
    with its output (a manifest, a sumfile) empty or short, and a later step would ship that.
    """
    folders: set[Path] = set()
    for path in paths:
        folders.add(path.parent)
        if path.is_dir() and not path.is_symlink():
            for root, _dirs, files in os.walk(path):
                folders.add(Path(root))
                for name in files:
                    _fsync_file(Path(root) / name)
        else:
            _fsync_file(path)
    for folder in sorted(folders):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(folder)


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return  # a link: nothing of ours to make durable
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_small_file(path: Path, limit: int) -> bytes:
    """The content of the regular file `path`, at most `limit` bytes.

    Opened without following a symlink and without blocking (a FIFO or a device is refused, never read),
    and read through the descriptor, so what is checked is what is read. Raises OSError or `UnsafeFile`.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile("is a symlink, which is never followed") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{describe_type(info.st_mode)} is never read; only regular files are")
        if info.st_size > limit:
            raise UnsafeFile(f"is {info.st_size} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise UnsafeFile(f"grew beyond the limit of {limit} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def describe_type(mode: int) -> str:
    """`a symlink`, `a FIFO`, ... for the file type in `mode`."""
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISREG, "a file")):  # fmt: skip
        if test(mode):
            return name
    return "a special file"


def remove_tree(path: Path) -> None:
    """Remove `path` (a folder tree or a file) without following links; missing is fine.

    shutil.rmtree recurses, so a tree nested deeper than Python's recursion limit (a producer's
    1,000-level folder) is handed to `rm`, which walks it without recursion.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except (RecursionError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENAMETOOLONG, errno.EMFILE, errno.ENOTEMPTY):
            raise
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)  # fmt: skip


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when it is missing or not an object."""
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
