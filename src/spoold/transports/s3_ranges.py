"""One S3 object into a local file: a single GET, or parallel ranged GETs that resume after a restart.

Bodies stream in 256 KiB reads straight to their offset in the file (`pwrite`), so
memory stays near `concurrency` x 256 KiB whatever size the server claims, and no more
than the expected bytes of a range are ever read. Every GET carries `If-Match` with
the ETag the download started with, so parts of two versions of an object never mix.

A large object is cut into `part_size` parts (fewer than `MAX_PARTS`), at most
`concurrency` in flight. A finished part is fsynced before it is recorded in the
checkpoint (`done`: runs of part indexes), so after `kill -9` a restarted daemon
fetches only the parts not recorded. The whole file's sha256 comes from a helper
thread that reads each part back, in order, as soon as it and all before it are
written: the pages were just written, so this costs a hash, not a disk read.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import botocore.exceptions

from spoold.errors import Interrupted, PermanentError, TransientError
from spoold.ratelimit import UNLIMITED, Limiter
from spoold.transports.base import TransferContext
from spoold.transports.s3_errors import error_code, mapped

log = logging.getLogger("spoold.s3")

# Small enough to stay in the CPU's cache between the socket, the hash and the page cache (measured: 1 MiB
# reads cost a third more system time), large enough that the per-read overhead does not show.
CHUNK_BYTES = 256 << 10
MAX_PARTS = 10_000
# A part whose connection dropped is asked for again this many times before the step fails for its retry policy.
PART_ATTEMPTS = 3
_REPORT_SECONDS = 0.5
_SHA256_HEX = frozenset("0123456789abcdef")
_MAX_ETAG_CHARS = 1024


class ObjectChanged(TransientError):
    """Raised when the object was replaced while it was being downloaded (its ETag no longer matches)."""


def expected_sha256(reply: Mapping[str, Any]) -> str | None:
    """The sha256 the content must have, from a HEAD or GET reply: spoold's `x-amz-meta-sha256`, else a
    full-object `ChecksumSHA256`; None when the server recorded neither (a composite checksum covers parts)."""
    recorded = str((reply.get("Metadata") or {}).get("sha256") or "").lower()
    if len(recorded) == 64 and set(recorded) <= _SHA256_HEX:
        return recorded
    checksum = str(reply.get("ChecksumSHA256") or "")
    if checksum and "-" not in checksum and reply.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        try:
            raw = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw.hex() if len(raw) == 32 else None
    return None


def checked_etag(value: object, where: str) -> str:
    """The server's ETag, if it can go back in an `If-Match` header: printable ASCII, bounded."""
    text = str(value or "")
    if not text or len(text) > _MAX_ETAG_CHARS or any(not " " < c <= "~" for c in text):
        raise PermanentError(f"{where}: the server sent an ETag that cannot be used ({text[:40]!r})")
    return text


def stream_into(
    body: Any, fd: int, start: int, end: int, check_stop: Callable[[], None], hasher: Any = None,
    on_bytes: Callable[[int], None] | None = None, limiter: Limiter = UNLIMITED,
) -> int:  # fmt: skip
    """Write `body` to `fd` at `start`, reading at most `end - start` bytes, paced by `limiter`; how many arrived."""
    offset = start
    chunk_bytes = limiter.piece_bytes(CHUNK_BYTES)
    while offset < end:
        check_stop()
        # `read`, not `readinto`: urllib3's readinto reads and then copies, one more pass over every byte.
        data = body.read(min(chunk_bytes, end - offset))
        if not data:
            break
        limiter.acquire(len(data))
        if hasher is not None:
            hasher.update(data)
        n, written = len(data), 0
        view = memoryview(data)
        while written < n:
            written += os.pwrite(fd, view[written:], offset + written)
        offset += n
        if on_bytes is not None:
            on_bytes(offset - start)
    return offset - start


def runs(indexes: Iterable[int]) -> list[list[int]]:
    """[[first, last], ...] of sorted indexes: the checkpoint of a 10,000-part download stays small."""
    out: list[list[int]] = []
    for index in sorted(indexes):
        if out and out[-1][1] == index - 1:
            out[-1][1] = index
        else:
            out.append([index, index])
    return out


def from_runs(saved: object, count: int) -> set[int]:
    found: set[int] = set()
    for pair in saved if isinstance(saved, list) else []:
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair):
            found.update(range(max(pair[0], 0), min(pair[1], count - 1) + 1))
    return found


class RangedDownload:
    """The object `key` (`size` bytes, `etag`) into open file `fd`, as parallel ranged GETs; `run` gives its sha256."""

    def __init__(
        self, client: Any, bucket: str, key: str, size: int, etag: str, fd: int, part_size: int, concurrency: int,
        ctx: TransferContext,
    ) -> None:  # fmt: skip
        self.client, self.bucket, self.key, self.size, self.etag, self.fd = client, bucket, key, size, etag, fd
        self.part_size = max(part_size, -(-size // MAX_PARTS))
        self.count = -(-size // self.part_size)
        self.concurrency = concurrency
        self.ctx = ctx
        self.where = f"s3://{bucket}/{key}"
        self._abort = threading.Event()
        self._partial: dict[int, int] = {}
        self._bodies: set[Any] = set()
        self._lock = threading.Lock()
        self._hasher: _OrderedHasher | None = None

    def run(self) -> str:
        cp = self.ctx.checkpoint
        plan = {"key": self.key, "etag": self.etag, "size": self.size, "part_size": self.part_size}
        done = from_runs(cp.get("done"), self.count) if all(cp.get(k) == v for k, v in plan.items()) else set()
        if done and os.fstat(self.fd).st_size != self.size:
            done = set()  # the file is not the one the checkpoint describes
        if done:
            log.info("%s: resuming: %d of %d parts already here", self.where, len(done), self.count)
        else:
            cp.clear()
            cp.update(plan, done=[])
            os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.size)
        hasher = self._hasher = _OrderedHasher(self.fd, self.size, self.part_size, self.count)
        hasher.mark(done)
        try:
            self._fetch_missing(done)
            return hasher.result()
        finally:
            hasher.stop()

    def _fetch_missing(self, done: set[int]) -> None:
        missing = iter([i for i in range(self.count) if i not in done])
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-range")
        running: dict[Future[None], int] = {}
        try:
            while True:
                while len(running) < self.concurrency and (index := next(missing, None)) is not None:
                    running[pool.submit(self._part, index)] = index
                if not running:
                    return
                finished, _ = wait(running, timeout=_REPORT_SECONDS, return_when=FIRST_COMPLETED)
                failed = [f for f in finished if f.exception() is not None]
                self._record(done, [running.pop(f) for f in finished if f not in failed])
                for future in failed:
                    running.pop(future)
                    future.result()
                self._report(done)
                self.ctx.check_stop()
        except BaseException as exc:
            self._stop_workers(pool)
            # Parts that finished while the others stopped are kept, unless the object itself changed.
            if not isinstance(exc, ObjectChanged):
                self._record(done, [i for f, i in running.items() if not f.cancelled() and f.exception() is None])
            else:
                self.ctx.checkpoint.clear()
                self.ctx.save_checkpoint()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _record(self, done: set[int], finished: list[int]) -> None:
        if not finished:
            return
        os.fdatasync(self.fd)  # the bytes are on disk before the checkpoint says so
        done.update(finished)
        for index in finished:
            self._partial.pop(index, None)
        self.ctx.checkpoint["done"] = runs(done)
        self.ctx.save_checkpoint()
        if self._hasher is not None:
            self._hasher.mark(finished)

    def _report(self, done: set[int]) -> None:
        whole = sum(self._length(i) for i in done)
        self.ctx.progress(whole + sum(self._partial.values()), self.size)

    def _stop_workers(self, pool: ThreadPoolExecutor) -> None:
        self._abort.set()
        # A worker blocked on a stalled connection sees the flag only when bytes come: closing its body ends the read.
        with self._lock:
            bodies = list(self._bodies)
        for body in bodies:
            try:
                body.close()
            except Exception as exc:  # noqa: BLE001 - any failure to close is the same: the worker ends anyway
                log.debug("%s: closing a body: %s", self.where, exc)
        pool.shutdown(wait=True, cancel_futures=True)

    def _length(self, index: int) -> int:
        return min(self.part_size, self.size - index * self.part_size)

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise Interrupted("the download is stopping")

    def _part(self, index: int) -> None:
        for attempt in range(1, PART_ATTEMPTS + 1):
            try:
                self._fetch_range(index)
                return
            except (ObjectChanged, Interrupted, PermanentError):
                raise
            except TransientError as exc:
                if self._abort.is_set() or attempt == PART_ATTEMPTS:
                    raise
                log.info("%s part %d: %s; asking again (%d of %d)", self.where, index + 1, exc, attempt + 1,
                         PART_ATTEMPTS)  # fmt: skip

    def _fetch_range(self, index: int) -> None:
        start = index * self.part_size
        end = start + self._length(index)
        self._partial[index] = 0
        where = f"{self.where} bytes {start}-{end - 1}"
        with mapped(where), changed_on_412(where):
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}",
                                           IfMatch=self.etag)  # fmt: skip
            body = reply["Body"]
            with self._lock:
                self._bodies.add(body)
            try:
                if not str(reply.get("ContentRange") or "").startswith(f"bytes {start}-{end - 1}/"):
                    raise TransientError(f"{where}: the server answered with another range "
                                         f"({reply.get('ContentRange')!r})")  # fmt: skip

                def arrived(n: int) -> None:
                    self._partial[index] = n

                got = stream_into(body, self.fd, start, end, self._check_abort, on_bytes=arrived,
                                  limiter=self.ctx.limiter)  # fmt: skip
            finally:
                with self._lock:
                    self._bodies.discard(body)
                body.close()
        if got != end - start:
            self._check_abort()
            raise TransientError(f"{where}: the body ended after {got} bytes")


@contextlib.contextmanager
def changed_on_412(where: str) -> Iterator[None]:
    """botocore's PreconditionFailed (the `If-Match` ETag) -> `ObjectChanged`, before `mapped` sees it."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in ("PreconditionFailed", "412"):
            raise ObjectChanged(f"{where}: the object changed while it was downloaded; starting again") from None
        raise


class _OrderedHasher:
    """sha256 of a file whose parts are written in any order: each part is read back once it and all before are."""

    def __init__(self, fd: int, size: int, part_size: int, count: int) -> None:
        self.fd, self.size, self.part_size, self.count = fd, size, part_size, count
        self._ready: set[int] = set()
        self._is_stopped = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._hasher = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="s3-hash", daemon=True)
        self._thread.start()

    def mark(self, indexes: Iterable[int]) -> None:
        with self._cond:
            self._ready.update(indexes)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._is_stopped = True
            self._cond.notify()
        self._thread.join()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise TransientError(f"cannot read back the download to hash it: {self._error}")
        return self._hasher.hexdigest()

    def _run(self) -> None:
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        try:
            for index in range(self.count):
                with self._cond:
                    while index not in self._ready and not self._is_stopped:
                        self._cond.wait()
                    if index not in self._ready:
                        return
                offset = index * self.part_size
                end = min(self.size, offset + self.part_size)
                while offset < end:
                    n = os.preadv(self.fd, [view[: min(CHUNK_BYTES, end - offset)]], offset)
                    if not n:
                        raise OSError(f"the file ends at {offset} bytes")
                    self._hasher.update(view[:n])
                    offset += n
        except OSError as exc:
            self._error = exc
