"""s3:// downloads for `pull` and `fetch`: one object, or every object below a prefix, into a local folder.

`S3Transport.get_tree` delegates here. `s3://bucket/key` is an object when the
key exists (HEAD), else the prefix `key/`; `s3://bucket/prefix/` is always a
prefix. An object lands as a file, a prefix as a folder whose files are the keys
below it (a key ending in `/`, a folder marker, is skipped), through a `Landing`
under `.<name>.spoold.part` and renamed into place when complete.

The server is untrusted: every segment of every key is checked as one path
component, keys outside the prefix are refused, the listing is bounded by
`TreeLimits` and read twice (checked whole first, then downloaded), so a huge
prefix is never held in memory. Each object is verified against the sha256 it
records (`x-amz-meta-sha256`, which `ship` writes, or a full-object
`ChecksumSHA256`); a mismatch discards the download and is a `ChecksumMismatch`.
Without either only the size can be checked.

Objects of `part_size` or more go by parallel ranged GETs (`s3_ranges`), resumable
from the checkpoint; smaller ones in a prefix go `concurrency` at a time, each one
GET. For a prefix the checkpoint keeps `after`, the last key of the listing below
which everything has landed, and a restart lists from there.

With a `Cache`, an object's content key (its sha256, else ETag and size) is
looked up before downloading, and a verified download is added to it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from spoold.cache import Cache, content_key
from spoold.errors import ChecksumMismatch, Interrupted, PermanentError, RemoteMissing, TransientError
from spoold.ratelimit import Limiter
from spoold.transports.base import TransferContext, TreeLimits, check_component, shown_name
from spoold.transports.landing import Landing
from spoold.transports.local import PART_SUFFIX, part_name
from spoold.transports.s3_errors import http_status, mapped
from spoold.transports.s3_ranges import RangedDownload, changed_on_412, checked_etag, expected_sha256, stream_into

log = logging.getLogger("spoold.s3")

# How often a prefix's progress (`after`) is written to the sidecar while small objects stream in.
_SAVE_SECONDS = 2.0


@dataclass(frozen=True)
class RemoteObject:
    """One object as HEAD or a listing describes it; `sha256` is None until a HEAD or GET says."""

    key: str
    size: int
    etag: str
    sha256: str | None = None


class S3Download:
    """Downloads from one bucket through a connected boto3 `client`."""

    def __init__(self, client: Any, bucket: str, part_size: int, concurrency: int) -> None:
        self.client = client
        self.bucket = bucket
        self.part_size = part_size
        self.concurrency = concurrency

    def get_tree(
        self, source: str, target: Path, ctx: TransferContext, *, name: str | None, limits: TreeLimits | None,
        cache: Cache | None,
    ) -> list[Path]:  # fmt: skip
        key = source.lstrip("/")
        where = f"s3://{self.bucket}/{key}"
        with mapped(where):
            found = self.head(key) if key and not key.endswith("/") else None
            if found is not None:
                default = key.rsplit("/", 1)[-1]
                final = check_component(default if name is None else name, f"pull from {where}")
                return [self._pull_object(found, target, final, ctx, cache)]
            prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
            default = prefix.rstrip("/").rsplit("/", 1)[-1] or self.bucket
            final = check_component(default if name is None else name, f"pull from {where}")
            return [self._pull_prefix(prefix, target, final, ctx, limits or TreeLimits(), cache)]

    def head(self, key: str) -> RemoteObject | None:
        where = f"s3://{self.bucket}/{key}"
        try:
            reply = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) == 404:
                return None
            raise
        size = int(reply.get("ContentLength") or 0)
        return RemoteObject(key, max(size, 0), checked_etag(reply.get("ETag"), where), expected_sha256(reply))

    # -- one object -----------------------------------------------------------------------------------

    def get_listed(self, key: str, size: int, etag: str, target: Path, name: str, ctx: TransferContext) -> Path | None:
        """An object as a listing described it, into `target/name`; None when it is gone.

        A small one takes one GET (`If-Match` on the listed ETag, verified against the sha256 the GET
        reply records); a large one is HEADed first for its sha256, as `get_tree` does.
        """
        where = f"s3://{self.bucket}/{key}"
        with mapped(where):
            try:
                found = RemoteObject(key, size, etag) if size < self.part_size else self.head(key)
                return None if found is None else self._pull_object(found, target, name, ctx, None)
            except botocore.exceptions.ClientError as exc:
                if http_status(exc) == 404:
                    return None
                raise

    def _pull_object(self, found: RemoteObject, target: Path, name: str, ctx: TransferContext,
                     cache: Cache | None) -> Path:  # fmt: skip
        tmp = part_name(name, PART_SUFFIX)
        with Landing(target) as landing:
            landing.check_replaceable(name, False)  # before the download, which may be long; again at publish
            self.land(landing, [tmp], found, ctx, cache)
            return landing.publish(tmp, name)

    def land(self, landing: Landing, parts: Sequence[str], found: RemoteObject, ctx: TransferContext,
             cache: Cache | None) -> None:  # fmt: skip
        """Download `found` to `parts` inside `landing` (or link it from `cache`), verified."""
        where = f"s3://{self.bucket}/{found.key}"
        cache_key = content_key(found.sha256, found.etag, found.size) if cache is not None else None
        folder = landing.folder(parts[:-1])
        try:
            if cache is not None and cache_key is not None and cache.serve(cache_key, folder, parts[-1]):
                log.info("%s: served from the cache (%s)", where, cache_key)
                ctx.progress(found.size, found.size)
                return
            writer, _ = landing.open_file(parts)
            with writer:
                fd = writer.fileno()
                if found.size >= self.part_size:
                    actual = RangedDownload(self.client, self.bucket, found.key, found.size, found.etag, fd,
                                            self.part_size, self.concurrency, ctx).run()  # fmt: skip
                    expected = found.sha256
                else:
                    actual, expected = self._get_whole(found, fd, ctx)
                os.fsync(fd)
            problem = None
            if os.stat(parts[-1], dir_fd=folder, follow_symlinks=False).st_size != found.size:
                problem = f"holds a different size than the {found.size} bytes listed"
            elif expected is not None and actual != expected:
                problem = f"has sha256 {actual[:16]}…, but the object records {expected[:16]}…"
            if problem:
                # A bad download is never resumed: its parts may be what is wrong.
                os.unlink(parts[-1], dir_fd=folder)
                ctx.checkpoint.clear()
                ctx.save_checkpoint()
                raise ChecksumMismatch(f"{where}: the download {problem}; it was discarded")
            if cache is not None:
                key = content_key(expected, found.etag, found.size)
                if key is not None:
                    cache.insert(key, folder, parts[-1], actual, found.size)
        finally:
            os.close(folder)

    def _get_whole(self, found: RemoteObject, fd: int, ctx: TransferContext) -> tuple[str, str | None]:
        """One GET of a small object into `fd`: (sha256 of what arrived, sha256 the object records)."""
        where = f"s3://{self.bucket}/{found.key}"
        os.ftruncate(fd, 0)
        hasher = hashlib.sha256()
        with changed_on_412(where):
            reply = self.client.get_object(Bucket=self.bucket, Key=found.key, IfMatch=found.etag)
        body = reply["Body"]
        try:
            # One byte past the listed size is enough to know the server sent more than it said.
            got = stream_into(body, fd, 0, found.size + 1, ctx.check_stop, hasher,
                              on_bytes=lambda n: ctx.progress(n, found.size), limiter=ctx.limiter)  # fmt: skip
        finally:
            body.close()
        if got < found.size:
            raise TransientError(f"{where}: the body ended after {got} of {found.size} bytes")
        return hasher.hexdigest(), found.sha256 or expected_sha256(reply)

    # -- a prefix -------------------------------------------------------------------------------------

    def _pull_prefix(self, prefix: str, target: Path, name: str, ctx: TransferContext, limits: TreeLimits,
                     cache: Cache | None) -> Path:  # fmt: skip
        where = f"s3://{self.bucket}/{prefix}"
        count = total = 0
        for _relative, found in self.listing(prefix, limits, ""):
            count += 1
            total += found.size
        if not count:
            raise RemoteMissing(f"{where} does not exist: no object has that key or lies below it")
        tmp = part_name(name, PART_SUFFIX)
        cp = ctx.checkpoint
        with Landing(target) as landing:
            landing.check_replaceable(name, True)
            # What `after` says has landed is only there while the partial folder is; else everything goes again.
            if not (cp.get("prefix") == prefix and isinstance(cp.get("after"), str) and _is_folder(landing, tmp)):
                landing.remove(tmp)
                cp.clear()
                cp.update(prefix=prefix, after="", landed_bytes=0)
                ctx.save_checkpoint()
            landing.makedirs([tmp])
            self._fill(landing, tmp, prefix, limits, ctx, cache, total)
            return landing.publish(tmp, name)

    def _fill(self, landing: Landing, tmp: str, prefix: str, limits: TreeLimits, ctx: TransferContext,
              cache: Cache | None, total: int) -> None:  # fmt: skip
        """Download every object listed after the checkpoint's `after` into the partial folder `tmp`."""
        cp = ctx.checkpoint
        window: collections.deque[tuple[RemoteObject, Future[None]]] = collections.deque()
        last_save = time.monotonic()

        def landed(found: RemoteObject) -> None:
            nonlocal last_save
            cp["after"] = found.key
            cp["landed_bytes"] = int(cp.get("landed_bytes") or 0) + found.size
            ctx.progress(cp["landed_bytes"], total)
            if time.monotonic() - last_save >= _SAVE_SECONDS:
                ctx.save_checkpoint()
                last_save = time.monotonic()

        def settle_oldest() -> None:
            found, future = window[0]
            future.result()  # a failure stays first in the window, so `after` never passes it
            window.popleft()
            landed(found)

        abort = threading.Event()

        def check_stop() -> None:
            if abort.is_set():
                raise Interrupted("the pull is stopping")
            ctx.check_stop()

        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-get")
        try:
            for relative, found in self.listing(prefix, limits, cp["after"]):
                ctx.check_stop()
                parts = [tmp, *relative.split("/")]
                if found.size >= self.part_size:
                    while window:
                        settle_oldest()
                    ctx.save_checkpoint()
                    self._land_large(landing, parts, found, ctx, cache, total)
                    landed(found)
                    continue
                while len(window) >= self.concurrency:
                    settle_oldest()
                window.append((found, pool.submit(self._land_small, landing, parts, found, cache, check_stop,
                                                  ctx.limiter)))  # fmt: skip
            while window:
                settle_oldest()
        except BaseException:
            # Objects in flight stop at their next read; all after the first unfinished one go again next time.
            abort.set()
            for _found, future in window:
                future.cancel()
            pool.shutdown(wait=True)
            while window and not window[0][1].cancelled() and window[0][1].exception() is None:
                landed(window.popleft()[0])
            ctx.save_checkpoint()
            raise
        finally:
            pool.shutdown(wait=True)
        ctx.save_checkpoint()

    def _land_large(self, landing: Landing, parts: Sequence[str], listed: RemoteObject, ctx: TransferContext,
                    cache: Cache | None, total: int) -> None:  # fmt: skip
        # The listing has no metadata: HEAD gives the sha256 to verify against (and the ETag of now).
        found = self.head(listed.key)
        if found is None:
            raise TransientError(f"s3://{self.bucket}/{listed.key} went away while the prefix was pulled")
        base = int(ctx.checkpoint.get("landed_bytes") or 0)
        sub = ctx.sub(lambda n, _t: ctx.progress(base + n, total), ctx.checkpoint.setdefault("current", {}))
        self.land(landing, parts, found, sub, cache)
        ctx.checkpoint.pop("current", None)

    def _land_small(self, landing: Landing, parts: Sequence[str], listed: RemoteObject, cache: Cache | None,
                    check_stop: Callable[[], None], limiter: Limiter) -> None:  # fmt: skip
        where = f"s3://{self.bucket}/{listed.key}"
        with mapped(where):
            found = listed
            if cache is not None:
                # The cache is keyed by content: only HEAD has the sha256 that names it.
                found = self.head(listed.key) or listed
            quiet = TransferContext(progress=lambda _d, _t: None, checkpoint={}, save_checkpoint=lambda: None,
                                    check_stop=check_stop, limiter=limiter)  # fmt: skip
            self.land(landing, parts, found, quiet, cache)

    def listing(self, prefix: str, limits: TreeLimits, after: str) -> Iterator[tuple[str, RemoteObject]]:
        """(relative path, object) of each key below `prefix` after `after`, in key order, each one checked."""
        where = f"s3://{self.bucket}/{prefix}"
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if after:
            args["StartAfter"] = after
        count = 0
        folders: list[str] = []
        # A listing that never ends (a hostile server's endless continuation tokens) is bounded too.
        for _page in range(limits.files + 2):
            page = self.client.list_objects_v2(**args)
            for entry in page.get("Contents") or []:
                key = str(entry.get("Key") or "")
                if not key.startswith(prefix) or key <= after:
                    raise PermanentError(f"{where}: the server listed {shown_name(key)} outside the prefix or out "
                                         "of key order")  # fmt: skip
                relative = key[len(prefix) :]
                if not relative or relative.endswith("/"):
                    continue  # a folder marker: the folders come from the keys below it
                segments = relative.split("/")
                for segment in segments:
                    check_component(segment, f"{where} lists {shown_name(key)}")
                # Keys sharing a folder are next to each other in key order: a new folder is where they part.
                shared = 0
                while shared < min(len(folders), len(segments) - 1) and folders[shared] == segments[shared]:
                    shared += 1
                folders = segments[:-1]
                count += len(folders) - shared + 1
                limits.check(relative, count, where)
                size = int(entry.get("Size") or 0)
                if size < 0:
                    raise PermanentError(f"{where}: the server lists {shown_name(key)} with a negative size")
                yield relative, RemoteObject(key, size, checked_etag(entry.get("ETag"), where))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            args["ContinuationToken"] = token
        raise PermanentError(f"{where}: the listing did not end after {limits.files + 2} pages")


def _is_folder(landing: Landing, name: str) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return stat.S_ISDIR(os.stat(name, dir_fd=landing.fd, follow_symlinks=False).st_mode)
    return False
