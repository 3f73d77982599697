"""bundle: the payload as one archive, so thousands of small files travel as one.

Options: `format` (`tar` or `zip`), `compression` (0-9: the deflate level of a
zip, or gzip level of a tar, which is then written as `.tar.gz`; default none).

Side effects: writes `<item>.tar`, `<item>.tar.gz` or `<item>.zip` into the
item's folder (under a temp name, renamed when complete) and makes it the
payload. Paths inside keep their place relative to the item: a bundle's files
sit under a top folder named after the item. The archive is hashed while it is
written (one pass): its sha256 goes into the item's digests, so `ship` verifies
it at the destination, and into the step's result. Archives are reproducible
(sorted entries, no owner names), so a re-run after a crash gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Literal

from spoold.errors import PermanentError, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.checksum import payload_files


@dataclasses.dataclass(frozen=True)
class BundleOptions:
    format: Literal["tar", "zip"] = "tar"
    compression: int | None = None

    def __post_init__(self) -> None:
        if self.compression is not None and not 0 <= self.compression <= 9:
            raise ValueError("compression must be a level from 0 to 9")


class HashingWriter:
    """A write-only, non-seekable file that hashes what passes through it.

    Being unseekable makes zipfile write data descriptors instead of seeking back,
    so the digest is of the final bytes without a second read.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha256 = hashlib.sha256()
        self.position = 0

    def write(self, data: bytes) -> int:
        self._file.write(data)
        self.sha256.update(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class Bundle(Handler[BundleOptions]):
    name = "bundle"
    Options = BundleOptions

    def run(self, ctx: StepContext) -> StepResult:
        files = payload_files(ctx)
        if not files:
            raise PermanentError("nothing to bundle: the payload has no files")
        suffix = ".zip" if self.options.format == "zip" else (".tar" if self.options.compression is None else ".tar.gz")
        target = ctx.item_dir / f"{ctx.item}{suffix}"
        tmp = ctx.item_dir / f".{target.name}.tmp"
        entries = [(path, self._arcname(ctx, path)) for path in files]
        total = sum(path.stat().st_size for path, _ in entries)
        writer = HashingWriter(tmp)
        try:
            if self.options.format == "zip":
                self._write_zip(ctx, writer, entries, total)
            else:
                self._write_tar(ctx, writer, entries, total)
            writer.close()
        except BaseException as exc:
            writer.close()
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise TransientError(f"cannot write {target.name}: {exc.strerror or exc}") from None
            raise
        os.replace(tmp, target)
        digest = writer.sha256.hexdigest()
        ctx.digests[target.name] = {"sha256": digest}
        result: dict[str, Any] = {"archive": target.name, "sha256": digest, "bytes": writer.position,
                                  "files": len(entries), "content_bytes": total}  # fmt: skip
        return StepResult(result=result, outputs=[target])

    @staticmethod
    def _arcname(ctx: StepContext, path: Path) -> str:
        relative = path.relative_to(ctx.item_dir)
        if len(ctx.payload) == 1 and ctx.payload[0].is_file():
            return path.name
        for root in ctx.payload:
            if root.is_dir() and (root == path.parent or root in path.parents):
                return str(Path(ctx.item) / path.relative_to(root))
        # Several outputs of an earlier step (videos) go under one folder named after the item.
        return str(Path(ctx.item) / relative.name)

    def _write_tar(self, ctx: StepContext, writer: HashingWriter, entries: list[tuple[Path, str]], total: int) -> None:
        level = self.options.compression
        stream: Any = writer if level is None else gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=level,
                                                                 mtime=0)  # fmt: skip
        done = 0
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for path, arcname in entries:
                ctx.check_stop()
                info = archive.gettarinfo(str(path), arcname)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as source:
                    archive.addfile(info, source)
                done += info.size
                ctx.progress(done, total)
        if level is not None:
            stream.close()

    def _write_zip(self, ctx: StepContext, writer: HashingWriter, entries: list[tuple[Path, str]], total: int) -> None:
        level = self.options.compression
        method = zipfile.ZIP_STORED if level is None else zipfile.ZIP_DEFLATED
        done = 0
        with zipfile.ZipFile(writer, mode="w", compression=method, compresslevel=level) as archive:
            for path, arcname in entries:
                ctx.check_stop()
                archive.write(path, arcname)
                done += path.stat().st_size
                ctx.progress(done, total)

