"""A content-addressed cache of downloaded objects, shared by every step of one node.

Configured once at the top level (`cache: {path, max}`) and used by `pull: {cache: true}`
on s3:// sources, whose HEAD names the content before a byte is downloaded: an object
whose sha256 (or ETag with size) is cached is hard-linked from here instead of being
downloaded, and each verified download is hard-linked in.

Layout under `path`:

    sha256/<hex>          content known by its sha256 (what spoold records on upload)
    etag/<etag>-<size>    content known only by the server's ETag and its size
    tmp/                  links on their way in
    index.sqlite          key -> sha256 of the content, size, last use

A hard link shares its bytes with the landed copy, so a later step that rewrites the
landed file in place rewrites the entry too. Every hit is therefore re-hashed against
the sha256 recorded when it went in, before it is served; an entry that fails is dropped
and the object downloaded again. That read runs at disk speed, not network speed, and it
is the one check that catches any change of bytes: size and mtime survive an in-place
write that wants them to, and ctime changes with every link anyway.

Entries beyond `max` bytes are evicted least recently used first, by a logical clock in
the index (immune to wall-clock jumps). The index is sqlite with its rollback journal, so
a crash leaves it at its last commit: a file whose row never committed (a crash mid-insert)
and a row whose file is gone (mid-eviction) are both swept at the first use after a start.
Hard links need the cache and the landing folder on one filesystem; across filesystems an
entry is copied instead (verified while copied), which costs the space and a local copy
but still no download. Failures of the cache itself never fail a step: they are logged and
the object is downloaded as if the cache were not there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from spoold.options import Bytes

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("spoold.cache")

INDEX = "index.sqlite"
FOLDERS = ("sha256", "etag", "tmp")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# An ETag is the server's text: only a plain token is used in a file name as it is; anything else is hashed.
_PLAIN_ETAG = re.compile(r"[A-Za-z0-9-]{1,128}")
# A link in tmp/ older than this lost its insert to a crash; younger ones may belong to a running insert.
_STALE_TMP_SECONDS = 3600.0
_CHUNK_BYTES = 1 << 20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SCHEMA = ("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, "
           "size INTEGER NOT NULL, last_used INTEGER NOT NULL)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The config's top-level `cache:`: the folder, and how many bytes of entries it keeps."""

    path: str
    max: Bytes

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("cache.path must name a folder")
        if self.max <= 0:
            raise ValueError("cache.max must be more than 0 bytes")


def content_key(sha256: str | None, etag: str | None, size: int) -> str | None:
    """`sha256/<hex>` when the content's sha256 is known, else `etag/<etag>-<size>`; None without either."""
    if sha256 and SHA256_HEX.fullmatch(sha256):
        return f"sha256/{sha256}"
    token = (etag or "").strip('"')
    if not token:
        return None
    if not _PLAIN_ETAG.fullmatch(token):
        token = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    return f"etag/{token}-{size}"


class Cache:
    """The cache folder at `root`, bounded to `max_bytes` of entries; safe to share among threads and processes."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._is_prepared = False

    @classmethod
    def from_spec(cls, spec: CacheSpec) -> Cache:
        return cls(Path(spec.path), int(spec.max))

    # -- what a download does ---------------------------------------------------------------------------

    def serve(self, key: str, dir_fd: int, name: str) -> bool:
        """Put the entry `key` at `name` in the folder `dir_fd` (replacing what is there) if it is cached and
        still hashes to what it held when it went in; False (a miss) otherwise."""
        import sqlite3  # see _index
        try:
            with self._index() as db:
                row = db.execute("SELECT sha256, size FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return False
            sha256, size = str(row[0]), int(row[1])
            placed = self._place(key, dir_fd, name)
            if placed is None:
                self._forget(key, None)
                return False
            actual, actual_size, inode = placed
            if (actual, actual_size) != (sha256, size):
                log.warning("cache entry %s no longer holds its content (sha256 %s…, %d bytes); downloading again",
                            key, actual[:16], actual_size)  # fmt: skip
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                self._forget(key, inode)
                return False
            with self._index() as db:
                db.execute("UPDATE entries SET last_used = (SELECT COALESCE(MAX(last_used), 0) + 1 FROM entries) "
                           "WHERE key = ?", (key,))  # fmt: skip
            return True
        except (OSError, sqlite3.Error) as exc:
            log.warning("cache %s: %s; downloading instead", self.root, _reason(exc))
            return False

    def insert(self, key: str, dir_fd: int, name: str, sha256: str, size: int) -> None:
        """Add the verified file `name` in folder `dir_fd` as entry `key`, whose content hashes to `sha256`."""
        if size > self.max_bytes:
            log.info("cache: %s (%d bytes) is larger than the whole cache (%d bytes); not cached", key, size,
                     self.max_bytes)  # fmt: skip
            return
        import sqlite3  # see _index

        tmp = f"tmp/{secrets.token_hex(8)}"
        try:
            self._prepare()
            if not self._link_in(dir_fd, name, tmp, sha256):
                return
            with self._index() as db:
                os.replace(self.root / tmp, self.root / key)
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, "
                           "(SELECT COALESCE(MAX(last_used), 0) + 1 FROM entries))", (key, sha256, size))  # fmt: skip
            self.evict()
        except (OSError, sqlite3.Error) as exc:
            log.warning("cache %s: cannot add %s: %s", self.root, key, _reason(exc))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.root / tmp)

    def evict(self) -> None:
        """Drop least recently used entries until the rest fit in `max_bytes`."""
        with self._index() as db:
            kept = 0
            for key, size in db.execute("SELECT key, size FROM entries ORDER BY last_used DESC").fetchall():
                kept += int(size)
                if kept > self.max_bytes:
                    # File first: a crash here leaves a row without a file, which the next lookup drops.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.root / key)
                    db.execute("DELETE FROM entries WHERE key = ?", (key,))
                    log.info("cache: evicted %s (%d bytes)", key, size)

    def entries(self) -> list[tuple[str, int]]:
        """(key, size) of every entry, most recently used first."""
        with self._index() as db:
            rows = db.execute("SELECT key, size FROM entries ORDER BY last_used DESC").fetchall()
        return [(str(key), int(size)) for key, size in rows]

    # -- the folder and its index -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _index(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the index's write lock, so every thread and process sharing it takes turns."""
        # Imported where used: only a configured cache needs SQLite, about 1 MB resident a daemon without one
        # (most nodes, on 512 MB boards) never pays.
        import sqlite3

        self._prepare()
        db = sqlite3.connect(self.root / INDEX, timeout=60, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def _prepare(self) -> None:
        """Make the folder on first use and sweep what a crash left behind."""
        import sqlite3  # see _index

        with self._lock:
            if self._is_prepared:
                return
            for folder in FOLDERS:
                (self.root / folder).mkdir(mode=0o750, parents=True, exist_ok=True)
            try:
                self._sweep()
            except sqlite3.DatabaseError as exc:
                # The index is only a cache's bookkeeping: a damaged one is started afresh, and the sweep
                # then removes the files it no longer knows.
                log.warning("cache %s: the index is damaged (%s); starting it afresh", self.root, exc)
                (self.root / INDEX).unlink(missing_ok=True)
                self._sweep()
            self._is_prepared = True

    def _sweep(self) -> None:
        import sqlite3  # see _index

        db = sqlite3.connect(self.root / INDEX, timeout=60, isolation_level=None)
        try:
            db.execute(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            known = {str(key) for (key,) in db.execute("SELECT key FROM entries")}
            for key in sorted(known):
                if not (self.root / key).is_file():
                    db.execute("DELETE FROM entries WHERE key = ?", (key,))
            for folder in ("sha256", "etag"):
                with os.scandir(self.root / folder) as listing:
                    for entry in listing:
                        if f"{folder}/{entry.name}" not in known:
                            log.info("cache: removing %s/%s, left by an interrupted insert", folder, entry.name)
                            _remove(Path(entry.path))
            now = time.time()
            with os.scandir(self.root / "tmp") as listing:
                for entry in listing:
                    # ctime, not mtime: a new link keeps its content's old mtime but gets a new ctime.
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat(follow_symlinks=False).st_ctime > _STALE_TMP_SECONDS:
                            _remove(Path(entry.path))
            db.execute("COMMIT")
        finally:
            db.close()

    def _forget(self, key: str, inode: int | None) -> None:
        """Drop the entry `key`; its file only if it is still the one found bad (`inode`), not a newer insert."""
        with self._index() as db:
            path = self.root / key
            with contextlib.suppress(FileNotFoundError):
                if inode is not None and os.stat(path, follow_symlinks=False).st_ino == inode:
                    path.unlink()
            db.execute("DELETE FROM entries WHERE key = ?", (key,))

    def _place(self, key: str, dir_fd: int, name: str) -> tuple[str, int, int] | None:
        """Link (or copy) the entry to `name`; (sha256, size, inode) of what landed there, None if it is gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)  # a partial download from an earlier attempt
        try:
            os.link(self.root / key, name, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            source = os.open(self.root / key, _READ_FLAGS)
            try:
                digest, size = _copy_hashing(source, dir_fd, name)
                return digest, size, os.fstat(source).st_ino
            finally:
                os.close(source)
        # Hashed through the landed link: whatever happens to the entry from now on, this is what is served.
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            return _hash_fd(fd), info.st_size, info.st_ino
        finally:
            os.close(fd)

    def _link_in(self, dir_fd: int, name: str, tmp: str, sha256: str) -> bool:
        """`name` as `tmp` in the cache: a hard link, or a verified copy across filesystems."""
        try:
            os.link(name, self.root / tmp, src_dir_fd=dir_fd, follow_symlinks=False)
            return True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        target = os.open(self.root / "tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        source = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        try:
            digest, _size = _copy_hashing(source, target, tmp.rpartition("/")[2])
        finally:
            os.close(source)
            os.close(target)
        if digest != sha256:
            log.warning("cache: %s changed while being copied in; not cached", name)
            return False
        return True


def _hash_fd(fd: int) -> str:
    hasher = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    offset = 0
    while n := os.preadv(fd, [view], offset):
        hasher.update(view[:n])
        offset += n
    return hasher.hexdigest()


def _copy_hashing(source: int, dir_fd: int, name: str) -> tuple[str, int]:
    """Copy open file `source` to a new `name` in folder `dir_fd`, fsynced; (its sha256, its size)."""
    hasher = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    target = os.open(name, _CREATE_FLAGS, 0o644, dir_fd=dir_fd)
    size = 0
    try:
        while n := os.readv(source, [view]):
            hasher.update(view[:n])
            written = 0
            while written < n:
                written += os.write(target, view[written:n])
            size += n
        os.fsync(target)
    finally:
        os.close(target)
    return hasher.hexdigest(), size


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                _remove(child)
            path.rmdir()
        else:
            path.unlink()


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
