"""file:// shared documents: a lock file beside the document, held across read-compare-replace.

The version of a document is the sha256 of its content, so it changes exactly
when the content does. A write takes an exclusive `flock` on `.<name>.spoold.lock`
in the document's folder, checks that the document still has the version the
writer read, and replaces it atomically (temp file, fsync, rename, fsync the
folder): readers, who take no lock, see the old or the new document, never a
mix. Every writer of the document, on this machine or another mounting the same
folder, must go through spoold, which takes the same lock; a writer that does
not is still caught when it changed the content before the lock was taken.

The lock file is never removed: removing it while another writer waits on it
would let a third one lock a new file of that name, and two writers would hold
"the" lock at once. Nothing at the document's path or the lock's is followed
when it is a symlink, and only regular files are read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from spoold.digest import CHUNK_BYTES
from spoold.errors import PermanentError, TransientError, VersionConflict
from spoold.fsio import FILE_MODE, UnsafeFile, describe_type, read_small_file, write_bytes_atomic
from spoold.transports.base import MAX_NAME_BYTES

LOCK_SUFFIX = ".spoold.lock"
# A writer holds the lock for one read and one durable replace; far longer means a stuck writer (a hung NFS
# server), and the step should give up and be retried rather than wait for ever.
LOCK_WAIT_SECONDS = 30.0
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Errors that may pass by themselves; the rest (a refused permission, a read-only filesystem) will not.
_PASSING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ESTALE})


def version_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def lock_path(path: Path) -> Path:
    """`.<name>.spoold.lock` beside the document, hashed when that name would pass 255 bytes."""
    name = f".{path.name}{LOCK_SUFFIX}"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        name = f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:32]}{LOCK_SUFFIX}"
    return path.with_name(name)


def read_document(path: Path, limit: int) -> tuple[bytes | None, str | None]:
    """The document's content and version, or (None, None) when there is no file at `path`."""
    with _mapped(path, "read"):
        try:
            data = read_small_file(path, limit)
        except FileNotFoundError:
            return None, None
    return data, version_of(data)


def write_document(path: Path, data: bytes, version: str | None) -> str:
    """Replace the document at `path` if it still has `version` (None: only if there is none); its new version."""
    with _mapped(path, "write"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            current = _current_version(path)
            if current != version:
                state = "was created" if version is None else "was removed" if current is None else "changed"
                raise VersionConflict(f"{path} {state} since it was read")
            write_bytes_atomic(path, data)
    return version_of(data)


def _current_version(path: Path) -> str | None:
    """The version of the file at `path`, hashed through one descriptor in chunks (any size), or None."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile("is a symlink, which is never followed") from None
        raise
    hasher = hashlib.sha256()
    try:
        _require_regular(fd)
        while chunk := os.read(fd, CHUNK_BYTES):
            hasher.update(chunk)
    finally:
        os.close(fd)
    return "sha256:" + hasher.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = lock_path(path)
    try:
        fd = os.open(lock, _OPEN_FLAGS | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermanentError(f"the lock file {lock} is a symlink, which is never followed") from None
        raise
    try:
        _require_regular(fd, f"the lock file {lock}")
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TransientError(f"{lock} has been locked by another writer for more than "
                                         f"{LOCK_WAIT_SECONDS:.0f}s") from None  # fmt: skip
            # Polled, not a blocking flock: a lock never released (a hung mount) must not hold the step for ever.
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def _require_regular(fd: int, what: str = "") -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        if what:
            raise PermanentError(f"{what} is {describe_type(mode)}; only a regular file is used")
        raise UnsafeFile(f"is {describe_type(mode)}; only a regular file is read")


@contextlib.contextmanager
def _mapped(path: Path, action: str) -> Iterator[None]:
    """OSError -> spoold's classes, naming the document."""
    try:
        yield
    except UnsafeFile as exc:
        raise PermanentError(f"{path} {exc}") from None
    except OSError as exc:
        reason = f"cannot {action} the shared document {path}: {exc.strerror or exc}"
        if exc.errno in _PASSING_ERRNOS:
            raise TransientError(reason) from None
        raise PermanentError(reason) from None
