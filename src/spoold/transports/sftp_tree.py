"""Folder-level SFTP helpers for the sftp:// transport: make, remove, match and walk remote trees, read files.

Functions over one `paramiko.SFTPClient`; error mapping stays with the
caller (`SftpTransport._mapped`). Imported only by `spoold.transports.sftp`.

The server is not trusted: every name it lists is checked as one path
component (`listing`), a symlink or special file in a tree being pulled is
refused, never read, trees are bounded in depth and count, and a size it
claims never sizes a buffer: files are read a bounded window at a time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import stat as statmod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import paramiko

from spoold.errors import PermanentError, TransientError
from spoold.transports.base import RemoteEntry, TransferContext, TreeLimits, check_component, join_remote
from spoold.transports.landing import Landing  # noqa: F401 - re-exported: tests import it from here
from spoold.transports.local import WATCH_REFUSED, describe_mode

# OpenSSH's sftp-server takes reads and writes up to 255 KiB; paramiko's default is 32 KiB.
REQUEST_BYTES = 255 * 1024
CHUNK_BYTES = 4 * REQUEST_BYTES
PREFETCH_REQUESTS = 64
# paramiko plans one request per 255 KiB of the size it is told up front; a window keeps that plan small.
WINDOW_BYTES = PREFETCH_REQUESTS * REQUEST_BYTES
LISTING_READ_AHEADS = 16
MAX_GLOB_FOLDERS = 10_000


def listing(client: paramiko.SFTPClient, folder: str) -> Iterator[paramiko.SFTPAttributes]:
    """The entries of a remote folder as they arrive, each name checked (paramiko drops `.` and `..`)."""
    try:
        for attrs in client.listdir_iter(folder, read_aheads=LISTING_READ_AHEADS):
            check_component(attrs.filename, f"remote folder {folder}")
            yield attrs
    except UnicodeDecodeError as exc:
        raise PermanentError(f"remote folder {folder} lists a name that is not UTF-8 "
                             f"({exc.object[max(exc.start - 20, 0) : exc.end + 20]!r}); it cannot be landed "
                             "under a checked name") from None  # fmt: skip


def makedirs(client: paramiko.SFTPClient, folder: str) -> None:
    if folder in ("", "/", "."):
        return
    try:
        if statmod.S_ISDIR(client.stat(folder).st_mode or 0):
            return
        raise PermanentError(f"remote {folder} exists and is not a folder")
    except FileNotFoundError:
        pass
    makedirs(client, posixpath.dirname(folder))
    try:
        client.mkdir(folder)
    except OSError:
        # Another worker may have made it meanwhile; anything else shows in this stat.
        client.stat(folder)


def rmtree(client: paramiko.SFTPClient, folder: str) -> None:
    for entry in list(listing(client, folder)):
        path = join_remote(folder, entry.filename)
        if statmod.S_ISDIR(entry.st_mode or 0):
            rmtree(client, path)
        else:
            client.remove(path)
    client.rmdir(folder)


def has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def entry(path: str, attrs: paramiko.SFTPAttributes) -> RemoteEntry:
    return RemoteEntry(path, attrs.st_size or 0, float(attrs.st_mtime or 0), statmod.S_ISDIR(attrs.st_mode or 0))


def match(client: paramiko.SFTPClient, folder: str, parts: list[str], budget: list[int]) -> list[RemoteEntry]:
    """Entries below `folder` matching the pattern `parts` (`*`, `?`, `[..]`, `**`); hidden names only when asked."""
    budget[0] += 1
    if budget[0] > MAX_GLOB_FOLDERS:
        raise PermanentError(f"glob under {folder} visits more than {MAX_GLOB_FOLDERS} folders; narrow the pattern")
    head, rest = parts[0], parts[1:]
    try:
        entries = list(listing(client, folder))
    except FileNotFoundError:
        return []
    found: list[RemoteEntry] = []
    if head == "**" and rest:
        found += match(client, folder, rest, budget)
    for attrs in sorted(entries, key=lambda a: a.filename):
        name = attrs.filename
        if name.startswith(".") and not head.startswith("."):
            continue
        path = join_remote(folder, name)
        is_dir = statmod.S_ISDIR(attrs.st_mode or 0)
        if head == "**":
            if not rest:
                found.append(entry(path, attrs))
            if is_dir:
                found += match(client, path, parts, budget)
        elif fnmatch.fnmatchcase(name, head):
            if not rest:
                found.append(entry(path, attrs))
            elif is_dir:
                found += match(client, path, rest, budget)
    return found


def walk(client: paramiko.SFTPClient, origin: str, limits: TreeLimits) -> list[tuple[str, int]]:
    """(relative path, size) of every regular file below `origin`, folders with size -1, in sorted order.

    The whole tree is listed and checked before anything is downloaded: a bad name, a symlink or special
    file (never followed or read), or a tree deeper or bigger than `limits` fails the pull at once.
    """
    out: list[tuple[str, int]] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        folder = join_remote(origin, relative) if relative else origin
        entries: list[paramiko.SFTPAttributes] = []
        for attrs in listing(client, folder):
            entries.append(attrs)
            limits.check(f"{relative}/{attrs.filename}" if relative else attrs.filename, len(out) + len(entries),
                         f"remote {origin}")  # fmt: skip
        folders = []
        for attrs in sorted(entries, key=lambda a: a.filename):
            path = f"{relative}/{attrs.filename}" if relative else attrs.filename
            mode = attrs.st_mode
            if mode is not None and statmod.S_ISDIR(mode):
                out.append((path, -1))
                folders.append(path)
            elif mode is not None and statmod.S_ISREG(mode):
                out.append((path, attrs.st_size or 0))
            else:
                raise PermanentError(f"remote {join_remote(origin, path)} is {describe_mode(mode)}; only regular "
                                     "files and folders are pulled, and a symlink is never followed")  # fmt: skip
        pending += reversed(folders)
    return sorted(out)


def pull_listing(
    client: paramiko.SFTPClient, origin: str, shown: str, limits: TreeLimits
) -> tuple[bool, list[tuple[str, int]]]:
    """(whether `origin` is a folder, what `walk` lists of it); a file is the one entry `("", size)`.

    The root is the step's own path, so a link there is followed; a special file there is refused.
    """
    try:
        top = client.stat(origin)
    except FileNotFoundError:
        raise PermanentError(f"{shown} does not exist") from None
    if statmod.S_ISDIR(top.st_mode or 0):
        return True, walk(client, origin, limits)
    if not statmod.S_ISREG(top.st_mode or 0):
        raise PermanentError(f"{shown} is {describe_mode(top.st_mode)}; not pulled")
    return False, [("", top.st_size or 0)]


def list_tree(client: paramiko.SFTPClient, origin: str, limits: TreeLimits) -> list[RemoteEntry]:
    """`origin` and every entry below it as the server lists them (a symlink is an entry, never followed), sorted
    by path; [] when `origin` does not exist. Names are checked (`listing`) and the count and depth bounded."""
    try:
        top = client.lstat(origin)
    except FileNotFoundError:
        return []
    out = [entry(origin, top)]
    pending = [""] if statmod.S_ISDIR(top.st_mode or 0) else []
    while pending:
        relative = pending.pop()
        try:
            for attrs in listing(client, join_remote(origin, relative) if relative else origin):
                path = f"{relative}/{attrs.filename}" if relative else attrs.filename
                limits.check(path, len(out), f"remote {origin}", WATCH_REFUSED)
                out.append(entry(join_remote(origin, path), attrs))
                if statmod.S_ISDIR(attrs.st_mode or 0):
                    pending.append(path)
        except FileNotFoundError:
            continue  # removed while listed: its own entry is gone from the next listing too
    return sorted(out, key=lambda e: e.path)


def local_tree(source: Path) -> list[tuple[str, Path | None]]:
    """(relative path, file) for each file below `source` in sorted order; folders with None."""
    out: list[tuple[str, Path | None]] = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        base = Path(root).relative_to(source)
        out += [(str(base / d), None) for d in dirs]
        out += [(str(base / f), Path(root) / f) for f in sorted(files) if not (Path(root) / f).is_symlink()]
    return out


def read_range(
    stream: paramiko.SFTPFile, start: int, end: int, window_bytes: int = WINDOW_BYTES, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:  # fmt: skip
    """The bytes of an open remote file from `start` to `end` (or its end, if sooner), pipelined.

    paramiko's prefetch plans one request per 255 KiB of the size it is given, and buffers what comes
    back; the size is the server's word, so it is given one window at a time and memory stays near
    `window_bytes` whatever size the server claims. A capped download asks for a smaller window, since
    a prefetched window arrives at the link's full speed whatever pace it is read at.
    """
    stream.MAX_REQUEST_SIZE = REQUEST_BYTES
    stream.seek(start)
    done = start
    while done < end:
        window_end = min(end, done + window_bytes)
        stream.prefetch(window_end, PREFETCH_REQUESTS)
        while done < window_end:
            chunk = stream.read(min(chunk_bytes, window_end - done))
            if not chunk:
                return
            yield chunk
            done += len(chunk)


def read_back_sha256(client: paramiko.SFTPClient, path: str, length: int | None) -> str:
    """sha256 of the first `length` bytes (all when None) of a remote file, read with pipelined requests."""
    hasher = hashlib.sha256()
    with client.open(path, "rb") as stream:
        size = (stream.stat().st_size or 0) if length is None else length
        for chunk in read_range(stream, 0, size):
            hasher.update(chunk)
    return hasher.hexdigest()


def fetch(
    client: paramiko.SFTPClient, remote: str, writer: BinaryIO, offset: int, size: int, progress: Callable[[int], None],
    ctx: TransferContext,
) -> None:  # fmt: skip
    """Download `remote` into `writer`, which holds its first `offset` bytes from an earlier attempt; fsynced.

    Paced by `ctx` (its caps, and a stop noticed within one chunk); a stop leaves what arrived for a re-run.
    """
    if offset > size:
        offset = 0
    writer.seek(offset)
    writer.truncate()
    done = offset
    chunk_bytes = ctx.chunk_bytes(CHUNK_BYTES)
    # Under a cap, about one burst in flight: a prefetched window would arrive at the link's full speed.
    window = WINDOW_BYTES if not ctx.limiter.is_limited else max(REQUEST_BYTES, min(WINDOW_BYTES, 2 * chunk_bytes))
    with client.open(remote, "rb") as reader:
        for chunk in read_range(reader, offset, size, window, chunk_bytes):
            ctx.pace(len(chunk))
            writer.write(chunk)
            done += len(chunk)
            progress(done)
    writer.flush()
    os.fsync(writer.fileno())
    if done != size:
        raise TransientError(f"remote {remote} ended at {done} of {size} bytes")
