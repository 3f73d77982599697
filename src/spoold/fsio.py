"""Durable file primitives shared by the daemon, handlers and transports.

A durable replace writes a temp file in the same folder, fsyncs it, renames it
over the target and fsyncs the folder, so a reader sees the old or the new
file and a crash never loses the last state written. Writers into one folder
at the same time share its fsync (`fsync_dir`, a group commit).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("spoold.fsio")
FILE_MODE = 0o640
# Temp files are named by the writer, never by the target: a 250-byte item name still leaves a short,
# unique temp name, and O_EXCL | O_NOFOLLOW never writes through something planted at that name.
TEMP_SUFFIX = ".tmp"
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Temp names need only be unique among this process's writers: O_EXCL refuses anything else's (a leftover
# of an earlier run, a planted name), and that write fails rather than writing through it. A counter costs
# nothing per write, where a random token (secrets) read the kernel's random source every time.
_TEMP_PREFIX = f".{os.getpid()}-{os.urandom(4).hex()}-"
_temp_numbers = itertools.count()


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


def write_bytes_atomic(path: Path, data: bytes, mode: int = FILE_MODE, *, is_folder_synced: bool = True) -> None:
    """Replace `path` with `data` durably; readers see the old or the new file, never a mix.

    On any error (a full disk, a read-only remount) the old file stays as it was and the temp file goes.
    Without `is_folder_synced`, the rename is durable only once the caller fsyncs the folder (a batch).
    """
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f"{_TEMP_PREFIX}{next(_temp_numbers)}{TEMP_SUFFIX}")
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
    if is_folder_synced:
        fsync_dir(folder or ".")


class DeferredWrites:
    """Writes that wait for their time (a sidecar's held-back progress), done by one thread started on first use.

    A `threading.Timer` per held-back write cost a thread start per small item in a burst.
    """

    # The thread's least pause between wakes: what falls due meanwhile is written up to this much late, in one
    # wake, so a burst of small items costs a few wakes a second, not one an item.
    PAUSE_SECONDS = 0.02

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Callable[[], None]]] = []  # a heap of (when, order, write)
        self._order = itertools.count()
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, write: Callable[[], None]) -> None:
        """Call `write()` once `time.monotonic()` reaches `when`; it handles its own errors."""
        with self._changed:
            if not self._due or when < self._due[0][0]:
                self._changed.notify()
            heapq.heappush(self._due, (when, next(self._order), write))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spoold-deferred-writes", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                now, due = time.monotonic(), []
                while self._due and self._due[0][0] <= now:
                    due.append(heapq.heappop(self._due)[2])
            for write in due:
                try:
                    write()
                except Exception:
                    log.exception("a deferred write failed")  # a bug in one; the others still get written
            time.sleep(self.PAUSE_SECONDS)


def encode_json(document: object, *, indent: int | None = 2) -> bytes:
    """UTF-8 JSON ending in a newline. Text from names that are not UTF-8 (Python's lone surrogates) is
    written as JSON `\\udcXX` escapes, which read back to the same str: kept reversibly, never a crash."""
    text = json.dumps(document, indent=indent, ensure_ascii=False, default=str)
    return text.encode("utf-8", "backslashreplace") + b"\n"


def write_json_atomic(path: Path, document: dict[str, Any], mode: int = FILE_MODE) -> None:
    write_bytes_atomic(path, encode_json(document), mode)


class _FolderFlushes:
    """One folder's fsyncs, numbered: `started` is the last one begun, `finished` the last one over."""

    __slots__ = ("failed", "failure", "finished", "is_running", "started", "users")

    def __init__(self) -> None:
        self.users = 0  # callers inside fsync_dir for this folder; the entry goes with the last one
        self.started = 0
        self.finished = 0
        self.is_running = False
        self.failed = 0  # the number of the last fsync that raised, and what it raised
        self.failure: OSError | None = None


_flushes: dict[str, _FolderFlushes] = {}
_flushes_changed = threading.Condition(threading.Lock())


def fsync_dir(folder: Path | str) -> None:
    """Make durable every rename into `folder` (and every removal from it) that completed before this call.

    A group commit: callers at the same time share one fsync. A caller needs an fsync that *began* after it
    came in (one already running may have started before its rename); while one runs, those who came in meanwhile
    wait, and when it ends, one of them runs the next for all of them. So 4 workers writing sidecars into
    one status folder pay about one folder fsync per round instead of 4, and none returns early.
    """
    key = os.fspath(folder)
    with _flushes_changed:
        flushes = _flushes.get(key)
        if flushes is None:
            flushes = _flushes[key] = _FolderFlushes()
        flushes.users += 1
        needed = flushes.started + 1
        try:
            while flushes.finished < needed:
                if flushes.is_running:
                    _flushes_changed.wait()
                else:
                    _lead_flush(key, flushes)
            if flushes.failed >= needed and flushes.failure is not None:
                # One that covered this caller's rename failed: its rename may not be durable (a later fsync
                # that succeeds does not say it is; the kernel may have dropped the failed pages).
                failure = flushes.failure
                raise OSError(failure.errno, failure.strerror, failure.filename)
        finally:
            flushes.users -= 1
            if not flushes.users:
                del _flushes[key]


def _lead_flush(key: str, flushes: _FolderFlushes) -> None:
    """Run the next fsync of the folder for everyone waiting; called and returns with the lock held."""
    flushes.is_running = True
    flushes.started += 1
    number = flushes.started
    _flushes_changed.release()
    try:
        failure: OSError | None = None
        try:
            fd = os.open(key, _DIR_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            failure = exc
    finally:
        # Anything but an OSError (an interrupt) ends no fsync: a waiter runs the next one instead.
        _flushes_changed.acquire()
        flushes.is_running = False
        _flushes_changed.notify_all()
    flushes.finished = number
    if failure is not None:
        flushes.failed, flushes.failure = number, failure


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
