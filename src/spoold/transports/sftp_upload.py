"""Sending one file over SFTP: resume from a partial whose prefix matches, hash while sending, checkpoints.

The far side is asked for a digest the checksum step already gave, the fastest
of those it has a tool for (`FarDigests.algorithm_for`: xxh3_128 from
`checksum: {algorithms: [sha256, xxh3_128]}` and a far `xxh128sum`, else sha256
by openssl or python3): nothing is hashed here, the far side's digest is compared
with the known one, and only on a mismatch is the local file hashed again, to
tell a changed source from a damaged copy. The sending board (a Pi) is the
short one; the far host hashes. With nothing known, the far side's fastest
digest is computed here while sending, on a helper thread so it overlaps the
writes (hashlib and xxhash release the GIL), with a known one beside it (the
cheapest) if the far side has no tool for any known one. Imported only by
`spoold.transports.sftp`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
from paramiko.sftp import CMD_STATUS

from spoold.digest import ALGORITHMS, hash_file
from spoold.errors import Interrupted, PermanentError
from spoold.transports.base import TransferContext
from spoold.transports.sftp_digest import HASHERS, FarDigests
from spoold.transports.sftp_tree import CHUNK_BYTES, REQUEST_BYTES
from spoold.transports.stall import StallWatch

log = logging.getLogger("spoold.sftp")
CHECKPOINT_EVERY_BYTES = 64 << 20
# A slow (or capped) upload records its offset this often too, so a crash loses little to the prefix re-check.
CHECKPOINT_EVERY_SECONDS = 10.0
# The known digests that can prove a source unchanged while it is sent, cheapest first.
CHECK_ORDER = ("xxh3_128", "sha256")
# Answers to pipelined writes left pending: more than the SSH window holds, so reading the oldest never waits.
IN_FLIGHT = 32


class SendHasher:
    """Digests fed one chunk at a time on a helper thread: `update` returns at once, the next waits for it."""

    def __init__(self, algorithms: set[str]) -> None:
        self.hashers = {name: HASHERS[name]() for name in sorted(algorithms)}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftp-hash") if self.hashers else None
        self._pending: Future[None] | None = None

    def _feed(self, chunk: bytes) -> None:
        for hasher in self.hashers.values():
            hasher.update(chunk)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def update(self, chunk: bytes) -> None:
        if self._pool is not None:
            self._wait()
            self._pending = self._pool.submit(self._feed, chunk)

    def hexdigest(self, name: str) -> str:
        self._wait()
        return str(self.hashers[name].copy().hexdigest())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None



def unchanged(source: Path, algorithm: str, digest: str) -> None:
    """Raise PermanentError when `source` no longer hashes to the digest taken by the checksum step."""
    if algorithm not in ALGORITHMS or hash_file(source, [algorithm])[algorithm] != digest:
        raise PermanentError(f"{source.name} changed since its checksum was taken")


def send(
    client: paramiko.SFTPClient, source: Path, remote: str, ctx: TransferContext, base: int, *,
    given: Mapping[str, str], digests: FarDigests, timeout: float, opened: Callable[[str], None] | None = None,
) -> tuple[int, tuple[str, str], bool]:  # fmt: skip
    """Write `source` to `remote`; return (size, (algorithm, the digest the far side must show), whether it was
    hashed here).

    `given` are the source's known digests by algorithm: a source that hashed otherwise while sent is a
    PermanentError. `opened(algorithm)` is called once the remote file is open (created, truncated or kept for
    resuming), with the digest the far side will be asked for.
    """
    size = source.stat().st_size
    algorithm = digests.algorithm_for(given)
    known = given.get(algorithm)  # compared with the far side's digest: nothing to hash here
    # Else the proof that the source still matches its checksum: the cheapest known digest, beside the far one.
    check = None if known is not None else next((a for a in CHECK_ORDER if a in given), None)
    needed = set() if known is not None else {algorithm} if check is None else {algorithm, check}
    hasher = SendHasher(needed)
    try:
        with open(source, "rb", buffering=0) as reader:
            offset = _resume_offset(client, remote, reader, hasher, size, digests, algorithm)
            if not offset:
                hasher.close()
                hasher = SendHasher(needed)
                reader.seek(0)
            _write(client, reader, remote, ctx, base, size, offset, hasher, timeout,
                   None if opened is None else lambda: opened(algorithm))  # fmt: skip
        if check is not None and hasher.hexdigest(check) != given[check]:
            raise PermanentError(f"{source.name} changed since its checksum was taken")
        if known is not None:
            return size, (algorithm, known), False
        return size, (algorithm, hasher.hexdigest(algorithm)), True
    finally:
        hasher.close()


def _write(
    client: paramiko.SFTPClient, reader: Any, remote: str, ctx: TransferContext, base: int, size: int, offset: int,
    hasher: SendHasher, timeout: float, opened: Callable[[], None] | None,
) -> None:  # fmt: skip
    ctx.checkpoint.update(remote_tmp=remote, offset=offset)
    ctx.save_checkpoint()
    piece = ctx.chunk_bytes(CHUNK_BYTES)
    done = offset
    watch = StallWatch(client.get_channel().get_transport(), timeout)
    try:
        with watch, client.open(remote, "r+b" if offset else "wb") as writer:
            writer.MAX_REQUEST_SIZE = REQUEST_BYTES
            writer.set_pipelined(True)
            writer.seek(offset)
            if opened is not None:
                opened()
            saved, saved_at = offset, time.monotonic()
            ctx.progress(base + done, base + size)
            while chunk := reader.read(piece):
                watch.pause()
                ctx.pace(len(chunk))  # the caps, and a stop noticed within one piece
                watch.touch()
                hasher.update(chunk)
                pieces = memoryview(chunk)  # sliced without a copy: paramiko copies each into its request once
                for start in range(0, len(chunk), REQUEST_BYTES):  # one request each: the watch sees it
                    writer.write(pieces[start : start + REQUEST_BYTES])
                    _collect(writer, IN_FLIGHT)
                    watch.touch()
                done += len(chunk)
                ctx.progress(base + done, base + size)
                if done - saved >= CHECKPOINT_EVERY_BYTES or time.monotonic() - saved_at >= CHECKPOINT_EVERY_SECONDS:
                    ctx.checkpoint["offset"] = saved = done
                    saved_at = time.monotonic()
                    ctx.save_checkpoint()
            _collect(writer, 0)  # a write the server refused (a full disk) fails here, not silently at close
    except Interrupted:
        # Closing the file waited for the pipelined writes: the far side holds `done` bytes now.
        ctx.checkpoint["offset"] = done
        ctx.save_checkpoint()
        raise
    except (EOFError, OSError, paramiko.SSHException):
        if watch.fired:
            raise TimeoutError(f"no progress for {timeout:g}s") from None
        raise


def _collect(writer: paramiko.SFTPFile, keep: int) -> None:
    """Read the server's answers to all but the last `keep` pipelined writes, oldest first.

    paramiko itself waits for every answer once more than 100 are pending, which empties the pipeline each
    25 MiB, and at close it drops the answers still pending, errors included. Without its `_reqs` (another
    paramiko), its own way is left alone.
    """
    pending = getattr(writer, "_reqs", None)
    while pending is not None and len(pending) > keep:
        kind, _ = writer.sftp._read_response(pending.popleft())  # raises OSError on an error status
        if kind != CMD_STATUS:
            raise paramiko.SFTPError("Expected status")


def _resume_offset(
    client: paramiko.SFTPClient, remote: str, reader: Any, hasher: SendHasher, size: int, digests: FarDigests,
    algorithm: str,
) -> int:  # fmt: skip
    """How much of a remote partial can be kept: all of it when its prefix matches the local file."""
    try:
        existing = client.stat(remote).st_size or 0
    except FileNotFoundError:
        return 0
    if not 0 < existing <= size:
        return 0
    prefix = HASHERS[algorithm]()
    left = existing
    while left and (chunk := reader.read(min(CHUNK_BYTES, left))):
        prefix.update(chunk)
        hasher.update(chunk)
        left -= len(chunk)
    if digests.of_prefix(client, remote, existing, algorithm) != prefix.hexdigest():
        log.warning("%s: the partial upload does not match the local file; sending it again", remote)
        return 0
    log.info("%s: resuming upload at %d of %d bytes", remote, existing, size)
    return existing
