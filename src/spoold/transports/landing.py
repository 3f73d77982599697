"""The local side of a pull: a folder that receives a tree from an untrusted server (sftp://, s3://).

Shared by the transports that download, so none of them imports another's library
(an S3-only node never loads paramiko).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat as statmod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from spoold.errors import PermanentError
from spoold.transports.base import check_component
from spoold.transports.local import OLD_SUFFIX, describe_mode, part_name

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Readable too: a download split in parts is hashed by reading it back.
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Landing:
    """A local folder that receives a tree from an untrusted server; nothing written through it lands outside.

    Paths are lists of checked names, opened one component at a time below the
    folder's descriptor with O_NOFOLLOW, and files are created with O_EXCL: a
    symlink planted at any name inside (a partial download, a target) is refused,
    never followed. The folder itself is the operator's, so a link there is theirs.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> Landing:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    @contextlib.contextmanager
    def _refusing(self, parts: Sequence[str]) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                where = self.root / "/".join(parts)
                raise PermanentError(f"{where}: a symlink or another file is in the way inside the landing "
                                     "folder; it is never followed or written through") from None  # fmt: skip
            raise

    def folder(self, parts: Sequence[str]) -> int:
        """A descriptor of the folder at `parts`, made where missing; the caller closes it."""
        fd = os.dup(self.fd)
        try:
            for index, part in enumerate(parts):
                check_component(part, f"landing in {self.root}")
                with self._refusing(parts[: index + 1]):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def makedirs(self, parts: Sequence[str]) -> None:
        os.close(self.folder(parts))

    def open_file(self, parts: Sequence[str]) -> tuple[BinaryIO, int]:
        """(writer, bytes it already holds) for the file at `parts`, kept from an earlier attempt or made new."""
        parent = self.folder(parts[:-1])
        try:
            name = check_component(parts[-1], f"landing in {self.root}")
            with self._refusing(parts):
                try:
                    fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                except FileNotFoundError:
                    fd = os.open(name, _CREATE_FLAGS, 0o666, dir_fd=parent)
        finally:
            os.close(parent)
        info = os.fstat(fd)
        if not statmod.S_ISREG(info.st_mode):
            os.close(fd)
            raise PermanentError(f"{self.root / '/'.join(parts)} is {describe_mode(info.st_mode)}; not written")
        return os.fdopen(fd, "wb"), info.st_size

    def remove(self, name: str) -> None:
        """Remove the file or tree `name` directly in the folder (a stale partial download); missing is fine."""
        _remove_at(check_component(name, f"landing in {self.root}"), self.fd)

    def check_replaceable(self, final: str, is_tree: bool) -> os.stat_result | None:
        """What is at `final` now, if a pulled file (`is_tree` False) or folder may replace it; else PermanentError."""
        existing = _lstat(check_component(final, f"landing in {self.root}"), self.fd)
        if existing is not None and statmod.S_ISDIR(existing.st_mode) and not is_tree:
            raise PermanentError(f"{self.root / final} is a folder; a pulled file does not replace it")
        if existing is not None and is_tree and not statmod.S_ISDIR(existing.st_mode):
            raise PermanentError(f"{self.root / final} exists and is {describe_mode(existing.st_mode)}; a pulled "
                                 "folder does not replace it, and a symlink there is never followed")  # fmt: skip
        return existing

    def publish(self, tmp: str, final: str) -> Path:
        """Rename `tmp` to `final` in the folder; an earlier folder at `final` (a re-run) is replaced whole."""
        where = self.root / final
        is_tree = statmod.S_ISDIR(os.stat(tmp, dir_fd=self.fd, follow_symlinks=False).st_mode)
        existing = self.check_replaceable(final, is_tree)
        if existing is not None and is_tree:
            old = part_name(final, OLD_SUFFIX)
            _remove_at(old, self.fd)
            os.rename(final, old, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            os.rename(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            _remove_at(old, self.fd)
        else:
            os.replace(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)  # replaces a link itself, never its target
        os.fsync(self.fd)
        return where


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(name: str, dir_fd: int) -> None:
    info = _lstat(name, dir_fd)
    if info is not None and statmod.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    elif info is not None:
        os.unlink(name, dir_fd=dir_fd)
