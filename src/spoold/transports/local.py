"""file:// — a folder on this machine (another disk, an NFS mount, another spool's inbox).

Publishing writes `.<name>.spoold.part` (created anew, never through a link
planted at that name), fsyncs, drops it from the page cache and reads it back
to verify, then renames it into place and fsyncs the folder: whoever watches
the destination sees only whole, verified files. Symlinks inside a folder being
shipped are skipped, as by the other transports; a pulled folder holding one
is refused.

Also here, because every transport that lands a remote tree needs them without
importing paramiko or boto3: temp names (`part_name`). The bounds on a pulled
tree are `base.TreeLimits`; the rule for one untrusted name is `base.check_component`.
"""

from __future__ import annotations

import contextlib
import errno
import glob as globmod
import hashlib
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from spoold.digest import CHUNK_BYTES, SMALL_BUFFER_BYTES, hash_file
from spoold.errors import ChecksumMismatch, Interrupted, PermanentError, TransientError
from spoold.fsio import describe_type, fsync_dir
from spoold.transports import local_documents
from spoold.transports.base import (
    MAX_NAME_BYTES,
    Delivered,
    RemoteEntry,
    TransferContext,
    Transport,
    TreeLimits,
    check_component,
)

PART_SUFFIX = ".spoold.part"
OLD_SUFFIX = ".spoold.old"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# Why a tree that `wait: {settle: ...}` lists is refused when it passes its limits.
WATCH_REFUSED = "too large to watch for changes"


# -- untrusted names ------------------------------------------------------------------------------


def part_name(name: str, suffix: str) -> str:
    """`.<name><suffix>`, or a short hashed name when that would pass the 255-byte limit of a name."""
    candidate = f".{name}{suffix}"
    if len(os.fsencode(candidate)) <= MAX_NAME_BYTES:
        return candidate
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}{suffix}"


def describe_mode(mode: int | None) -> str:
    """`a symlink`, `a FIFO`, ... for the file type in `mode`."""
    return "of an unknown type" if mode is None else describe_type(mode)


def check_replaceable(final: Path, is_tree: bool) -> None:
    """A pulled file may replace a file (or a link itself), a pulled folder only a folder; never across kinds."""
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode) and not is_tree:
        raise PermanentError(f"{final} is a folder; a pulled file does not replace it")
    if is_tree and not stat.S_ISDIR(mode):
        raise PermanentError(f"{final} exists and is {describe_mode(mode)}; a pulled folder does not replace it, "
                             "and a symlink there is never followed")  # fmt: skip


def list_tree(root: str, limits: TreeLimits) -> list[RemoteEntry]:
    """`root` and everything below it by lstat (a symlink is an entry, never followed); [] when it is missing."""
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PermanentError(f"cannot stat {root}: {exc.strerror}") from None
    out = [RemoteEntry(root, top.st_size, top.st_mtime, stat.S_ISDIR(top.st_mode))]
    pending = [""] if stat.S_ISDIR(top.st_mode) else []
    while pending:
        relative = pending.pop()
        try:
            with os.scandir(os.path.join(root, relative) if relative else root) as listing:
                for entry in listing:
                    path = f"{relative}/{entry.name}" if relative else entry.name
                    # While listing: a huge folder is never held whole.
                    limits.check(path, len(out), root, WATCH_REFUSED)
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: the next listing differs
                        info = entry.stat(follow_symlinks=False)
                        out.append(RemoteEntry(entry.path, info.st_size, info.st_mtime, stat.S_ISDIR(info.st_mode)))
                        if stat.S_ISDIR(info.st_mode):
                            pending.append(path)
        except FileNotFoundError:
            continue  # removed while listed: its own entry is gone from the next listing too
        except OSError as exc:
            raise PermanentError(f"cannot list {os.path.join(root, relative)}: {exc.strerror}") from None
    return sorted(out, key=lambda e: e.path)


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a whole folder at `path`; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_local_tree(origin: Path, limits: TreeLimits) -> None:
    """Refuse a local folder to be pulled that holds a symlink or special file, or passes `limits`."""
    count = 0
    for root, dirs, files in os.walk(origin):
        for name in sorted(dirs + files):
            path = Path(root) / name
            relative = str(path.relative_to(origin))
            count += 1
            limits.check(relative, count, str(origin))
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise PermanentError(f"{path} is {describe_mode(mode)}; only regular files and folders are "
                                     "pulled, and a symlink is never followed")  # fmt: skip


# -- the file:// transport ------------------------------------------------------------------------


class LocalTransport(Transport):
    def _path(self, target: str) -> Path:
        return Path(target)

    def put_file(self, source: Path, target: str, digests: Mapping[str, str], ctx: TransferContext) -> Delivered:
        final = self._path(target)
        tmp = final.with_name(part_name(final.name, PART_SUFFIX))
        with _mapped_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            sent = _copy_hashing(source, tmp, ctx, is_resumable=True)
            expected = digests.get("sha256") or sent
            _verify(tmp, expected, final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        return Delivered(str(final), final.stat().st_size, is_verified=True)

    def put_tree(self, source: Path, target: str, digests: Mapping[str, Mapping[str, str]],
                 ctx: TransferContext) -> Delivered:  # fmt: skip
        final = self._path(target.rstrip("/"))
        tmp = final.with_name(part_name(final.name, PART_SUFFIX))
        total = 0
        with _mapped_errors(final):
            _remove(tmp)
            tmp.mkdir(parents=True)
            for root, dirs, files in os.walk(source):
                dirs.sort()
                relative_root = Path(root).relative_to(source)
                for d in dirs:
                    (tmp / relative_root / d).mkdir(exist_ok=True)
                for name in sorted(files):
                    if (Path(root) / name).is_symlink():
                        continue  # never followed (SPEC section 10); the S3 and SFTP transports skip them too
                    relative = str(relative_root / name) if str(relative_root) != "." else name
                    ctx.check_stop()
                    sent = _copy_hashing(Path(root) / name, tmp / relative, ctx)
                    _verify(tmp / relative, digests.get(relative, {}).get("sha256", sent), final / relative)
                    total += (tmp / relative).stat().st_size
            # An earlier delivery of the same item (re-run after a crash) is replaced whole.
            _remove(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        return Delivered(str(final), total, is_verified=True)

    def write_small(self, target: str, data: bytes) -> None:
        final = self._path(target)
        tmp = final.with_name(part_name(final.name, PART_SUFFIX))
        with _mapped_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            with _create(tmp) as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)

    def read_document(self, target: str, limit: int) -> tuple[bytes | None, str | None]:
        return local_documents.read_document(self._path(target), limit)

    def write_document(self, target: str, data: bytes, version: str | None) -> str:
        return local_documents.write_document(self._path(target), data, version)

    def stat(self, target: str) -> RemoteEntry | None:
        try:
            info = os.stat(target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PermanentError(f"cannot stat {target}: {exc.strerror}") from None
        return RemoteEntry(target, info.st_size, info.st_mtime, os.path.isdir(target))

    def glob(self, pattern: str) -> list[RemoteEntry]:
        entries = [self.stat(p) for p in globmod.glob(pattern, recursive=True)]
        return [e for e in entries if e is not None]

    def tree(self, target: str) -> list[RemoteEntry]:
        return list_tree(target.rstrip("/") or "/", TreeLimits())

    def read_bytes(self, target: str, limit: int = 1 << 20) -> bytes:
        try:
            with open(target, "rb") as stream:
                return stream.read(limit)
        except FileNotFoundError:
            raise PermanentError(f"{target} does not exist") from None
        except OSError as exc:
            raise TransientError(f"cannot read {target}: {exc.strerror}") from None

    def get_tree(
        self, source: str, target: Path, ctx: TransferContext, *, name: str | None = None,
        limits: TreeLimits | None = None,
    ) -> list[Path]:  # fmt: skip
        named = Path(source.rstrip("/"))
        # The root is the step's own path, so a link there is the operator's and is followed; nothing below is.
        origin = named.resolve()
        if not origin.exists():
            raise PermanentError(f"{source} does not exist")
        destination = target / check_component(named.name if name is None else name, f"pull from {source}")
        if origin.is_dir() and Path(os.path.abspath(destination)).is_relative_to(origin):
            raise PermanentError(f"pull from {source} into {destination}: the target lies inside the source")
        check_replaceable(destination, origin.is_dir())
        if origin.is_dir():
            check_local_tree(origin, limits or TreeLimits())
            self.put_tree(origin, str(destination), {}, ctx)
        else:
            self.put_file(origin, str(destination), {}, ctx)
        return [destination]


def _create(path: Path) -> BinaryIO:
    """`path` made anew for writing: a stale temp file goes first, and a link planted there is never followed."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return os.fdopen(os.open(path, _CREATE_FLAGS, 0o666), "wb", buffering=0)


def _copy_hashing(source: Path, target: Path, ctx: TransferContext, is_resumable: bool = False) -> str:
    """Copy `source` to `target` (fsynced), reading it once; return its sha256. Neither is read through a link.

    When `is_resumable`, a stop records the offset in `ctx.checkpoint` and keeps `target`; the next call
    continues it if its first `offset` bytes still hash like the source's (a capped copy of a big file is long).
    """
    hasher = hashlib.sha256()
    try:
        reader = os.fdopen(os.open(source, _READ_FLAGS), "rb", buffering=0)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermanentError(f"{source} is a symlink; it is never followed") from None
        raise
    with reader:
        info = os.fstat(reader.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PermanentError(f"{source} is {describe_mode(info.st_mode)}; only regular files are copied")
        size = info.st_size
        saved = ctx.checkpoint.get("offset") if is_resumable else None
        done = 0
        if isinstance(saved, int) and 0 < saved <= size:
            if _kept_prefix(reader, target, saved, hasher):
                done = saved
            else:
                hasher = hashlib.sha256()
                reader.seek(0)
        writer = _reopen(target, done) if done else _create(target)
        with writer:
            # No larger than what is left to copy: a 4 MiB zeroed buffer per 1 KiB file costs more than the copy.
            buffer = bytearray(min(ctx.chunk_bytes(CHUNK_BYTES), max(size - done + 1, SMALL_BUFFER_BYTES)))
            view = memoryview(buffer)
            try:
                while n := reader.readinto(view):
                    ctx.pace(n)  # the caps, and a stop noticed within one chunk
                    chunk = view[:n]
                    hasher.update(chunk)
                    writer.write(chunk)
                    done += n
                    ctx.progress(done, size)
            except Interrupted:
                if is_resumable:
                    os.fsync(writer.fileno())
                    ctx.checkpoint["offset"] = done
                    ctx.save_checkpoint()
                raise
            os.fsync(writer.fileno())
            # Verification below must read the disk, not the pages just written.
            os.posix_fadvise(writer.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return hasher.hexdigest()


def _kept_prefix(reader: BinaryIO, target: Path, offset: int, hasher: Any) -> bool:
    """Whether `target` (an earlier, stopped copy) starts with the first `offset` bytes of `reader`.

    Reads both prefixes a chunk at a time; `reader`'s goes into `hasher` (useless when the answer is no).
    """
    kept = hashlib.sha256()
    try:
        with os.fdopen(os.open(target, _READ_FLAGS), "rb", buffering=0) as earlier:
            if os.fstat(earlier.fileno()).st_size < offset:
                return False
            for stream, into in ((earlier, kept), (reader, hasher)):
                left = offset
                while left and (chunk := stream.read(min(CHUNK_BYTES, left))):
                    into.update(chunk)
                    left -= len(chunk)
                if left:
                    return False
    except OSError:
        return False
    return bool(kept.digest() == hasher.copy().digest())


def _reopen(path: Path, offset: int) -> BinaryIO:
    """An earlier copy at `path` opened to go on writing at `offset` (never through a link)."""
    writer = os.fdopen(os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "wb", buffering=0)
    writer.seek(offset)
    writer.truncate()
    return writer


def _verify(tmp: Path, expected: str, final: Path) -> None:
    actual = hash_file(tmp, ["sha256"])["sha256"]
    if actual != expected:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise ChecksumMismatch(f"copy at {final} has sha256 {actual[:16]}…, expected {expected[:16]}…")


class _mapped_errors(contextlib.AbstractContextManager[None]):  # noqa: N801 - used like a function
    """OSError -> spoold's classes: a full disk may pass, a refused permission will not."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            if exc.errno in (28, 122, 5):  # ENOSPC, EDQUOT, EIO
                raise TransientError(f"cannot write {self.target}: {reason}") from None
            raise PermanentError(f"cannot write {self.target}: {reason}") from None
