"""Folder-level SFTP helpers for the sftp:// transport: make, remove, match and walk remote trees, read files.

Functions over one `paramiko.SFTPClient`; error mapping stays with the
caller (`SftpTransport._mapped`). Imported only by `spoold.transports.sftp`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import stat as statmod
from collections.abc import Callable
from pathlib import Path

import paramiko

from spoold.errors import PermanentError, TransientError
from spoold.transports.base import RemoteEntry, join_remote

# OpenSSH's sftp-server takes reads and writes up to 255 KiB; paramiko's default is 32 KiB.
REQUEST_BYTES = 255 * 1024
CHUNK_BYTES = 4 * REQUEST_BYTES
PREFETCH_REQUESTS = 64
MAX_GLOB_FOLDERS = 10_000


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
    for entry in client.listdir_attr(folder):
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
        listing = client.listdir_attr(folder)
    except FileNotFoundError:
        return []
    found: list[RemoteEntry] = []
    if head == "**" and rest:
        found += match(client, folder, rest, budget)
    for attrs in sorted(listing, key=lambda a: a.filename):
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


def walk(client: paramiko.SFTPClient, origin: str, relative: str = "") -> list[tuple[str, int]]:
    """(relative path, size) of every regular file below `origin`; folders with size -1."""
    out: list[tuple[str, int]] = []
    listing = client.listdir_attr(join_remote(origin, relative) if relative else origin)
    for attrs in sorted(listing, key=lambda a: a.filename):
        path = posixpath.join(relative, attrs.filename) if relative else attrs.filename
        if statmod.S_ISDIR(attrs.st_mode or 0):
            out.append((path, -1))
            out += walk(client, origin, path)
        elif statmod.S_ISREG(attrs.st_mode or 0):
            out.append((path, attrs.st_size or 0))
    return out


def local_tree(source: Path) -> list[tuple[str, Path | None]]:
    """(relative path, file) for each file below `source` in sorted order; folders with None."""
    out: list[tuple[str, Path | None]] = []
    for root, dirs, files in os.walk(source):
        dirs.sort()
        base = Path(root).relative_to(source)
        out += [(str(base / d), None) for d in dirs]
        out += [(str(base / f), Path(root) / f) for f in sorted(files) if not (Path(root) / f).is_symlink()]
    return out


def read_back_sha256(client: paramiko.SFTPClient, path: str, length: int | None) -> str:
    """sha256 of the first `length` bytes (all when None) of a remote file, read with pipelined requests."""
    hasher = hashlib.sha256()
    with client.open(path, "rb") as stream:
        stream.MAX_REQUEST_SIZE = REQUEST_BYTES
        size = (stream.stat().st_size or 0) if length is None else length
        if size:
            stream.prefetch(size, PREFETCH_REQUESTS)
        left = size
        while left and (chunk := stream.read(min(CHUNK_BYTES, left))):
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.hexdigest()


def fetch(client: paramiko.SFTPClient, remote: str, local: Path, size: int, progress: Callable[[int], None]) -> None:
    """Download `remote` to `local`, continuing a partial `local` (ours, written in order); fsynced."""
    offset = local.stat().st_size if local.exists() else 0
    if offset > size:
        offset = 0
    with open(local, "r+b" if offset else "wb") as writer, client.open(remote, "rb") as reader:
        writer.seek(offset)
        writer.truncate()
        reader.MAX_REQUEST_SIZE = REQUEST_BYTES
        reader.seek(offset)
        if size > offset:
            reader.prefetch(size, PREFETCH_REQUESTS)
        done = offset
        while done < size and (chunk := reader.read(min(CHUNK_BYTES, size - done))):
            writer.write(chunk)
            done += len(chunk)
            progress(done)
        writer.flush()
        os.fsync(writer.fileno())
    if done != size:
        raise TransientError(f"remote {remote} ended at {done} of {size} bytes")
