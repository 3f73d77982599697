"""file:// — a folder on this machine (another disk, an NFS mount, another spool's inbox).

Publishing writes `.<name>.spoold.part`, fsyncs, drops it from the page cache
and reads it back to verify, then renames it into place and fsyncs the folder:
whoever watches the destination sees only whole, verified files.
"""

from __future__ import annotations

import contextlib
import glob as globmod
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from spoold.digest import CHUNK_BYTES, MultiHasher, hash_file
from spoold.errors import ChecksumMismatch, PermanentError, TransientError
from spoold.fsio import fsync_dir
from spoold.transports.base import Delivered, RemoteEntry, TransferContext, Transport

PART_SUFFIX = ".spoold.part"


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{PART_SUFFIX}")


class LocalTransport(Transport):
    def _path(self, target: str) -> Path:
        return Path(target)

    def put_file(self, source: Path, target: str, sha256: str | None, ctx: TransferContext) -> Delivered:
        final = self._path(target)
        tmp = _temp_name(final)
        with _mapped_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            sent = _copy_hashing(source, tmp, ctx)
            expected = sha256 or sent
            _verify(tmp, expected, final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        return Delivered(str(final), final.stat().st_size, is_verified=True)

    def put_tree(self, source: Path, target: str, digests: Mapping[str, str], ctx: TransferContext) -> Delivered:
        final = self._path(target.rstrip("/"))
        tmp = _temp_name(final)
        total = 0
        with _mapped_errors(final):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for root, dirs, files in os.walk(source):
                dirs.sort()
                relative_root = Path(root).relative_to(source)
                for d in dirs:
                    (tmp / relative_root / d).mkdir(exist_ok=True)
                for name in sorted(files):
                    relative = str(relative_root / name) if str(relative_root) != "." else name
                    ctx.check_stop()
                    sent = _copy_hashing(Path(root) / name, tmp / relative, ctx)
                    _verify(tmp / relative, digests.get(relative, sent), final / relative)
                    total += (tmp / relative).stat().st_size
            if final.exists():
                # An earlier delivery of the same item (re-run after a crash) is replaced whole.
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        return Delivered(str(final), total, is_verified=True)

    def write_small(self, target: str, data: bytes) -> None:
        final = self._path(target)
        tmp = _temp_name(final)
        with _mapped_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)

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

    def read_bytes(self, target: str, limit: int = 1 << 20) -> bytes:
        try:
            with open(target, "rb") as stream:
                return stream.read(limit)
        except FileNotFoundError:
            raise PermanentError(f"{target} does not exist") from None
        except OSError as exc:
            raise TransientError(f"cannot read {target}: {exc.strerror}") from None

    def get_tree(self, source: str, target: Path, ctx: TransferContext) -> list[Path]:
        origin = Path(source.rstrip("/"))
        if not origin.exists():
            raise PermanentError(f"{source} does not exist")
        destination = target / origin.name
        self.put_tree(origin, str(destination), {}, ctx) if origin.is_dir() else self.put_file(
            origin, str(destination), None, ctx
        )
        return [destination]


def _copy_hashing(source: Path, target: Path, ctx: TransferContext) -> str:
    """Copy `source` to `target` (fsynced), reading it once; return its sha256."""
    hasher = MultiHasher(["sha256"])
    size = source.stat().st_size
    done = 0
    with open(source, "rb", buffering=0) as reader, open(target, "wb", buffering=0) as writer:
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        while n := reader.readinto(view):
            chunk = view[:n]
            hasher.update(chunk)
            writer.write(chunk)
            done += n
            ctx.progress(done, size)
        os.fsync(writer.fileno())
        # Verification below must read the disk, not the pages just written.
        os.posix_fadvise(writer.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return hasher.hexdigests()["sha256"]


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
