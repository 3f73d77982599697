"""Upload bodies streamed from the file: a part is never held in memory whole.

A `PartBody` is the bytes [offset, offset + length) of an open file as a
seekable, readable file-like object, read with `os.pread` (so many parts share
one descriptor, each with its own position). botocore reads such a body in
pieces and seeks back between the passes: its Content-Length from
`seek(0, 2)` / `tell()` (botocore.utils.determine_content_length), the SigV4
payload hash on plain HTTP in 1 MiB reads (auth.SigV4Auth.payload, which
seeks back to where it started), a default checksum when none is given
(httpchecksum), and the send itself in urllib3's 16 KiB blocks; a retry
rewinds it with `seek(0)` (AWSPreparedRequest.reset_stream). Memory per part
in flight is one such read, not the part.

Only the send is paced (hashing is not sending), so a body starts waiting for
`pace(n)` per read when botocore's `before-send` says the request goes on the
wire, and a stop inside the send travels as `_StopPart` (no `Exception`, so
neither urllib3 nor botocore retry it, nor wrap it as an HTTP client error)
until `part_exceptions` turns it back into `Interrupted`; so does a file that
shrank since its part was hashed (`_Shrank`, then `ShortRead`, permanent).

The part's checksum comes from a streaming pass first (`range_digests`), in
`HASH_CHUNK` reads into one buffer; the MD5 only when asked (the resume check
of a part whose ETag is its MD5). That SHA-256 is also the part's SigV4
payload hash, which botocore computes with one more full pass on plain HTTP
(and on HTTPS too when the checksum header is not its own): `enable_part_pacing`
has UploadPart and PutObject signed by `KnownPayloadAuth`, botocore's own S3
signer except that a `PartBody` read from its start is hashed by what it knows.
Same signature, same signed payload, one SHA-256 pass fewer per part.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.auth
import botocore.handlers

from spoold.errors import Interrupted, PermanentError
from spoold.transports.s3_paced import UploadProgress

HASH_CHUNK = 256 << 10


class _StopPart(BaseException):
    """Raised from a part body's read while the daemon stops; passes through botocore's retry loop untouched."""


class _Shrank(BaseException):
    """Raised from a part body's read when the file ended first; botocore would retry an `Exception` as a
    transient failure of the HTTP client."""


class ShortRead(PermanentError):
    """The local file ended before the part did: it shrank while being uploaded."""


class PartBody:
    """Bytes [offset, offset + length) of the file open as `fd`, as an upload body that reads them as it goes.

    Once sending (`is_sending`, set by the `before-send` hook), every read waits for `pace(n)`, and `sent(n)`
    hears how far into the part the sending is (0 again when a retry rewinds it).
    """

    def __init__(self, fd: int, offset: int, length: int, pace: Callable[[int], None],
                 sent: Callable[[int], None], sha256: bytes | None = None) -> None:  # fmt: skip
        self._fd, self._offset, self._length = fd, offset, length
        self.sha256 = sha256  # of the whole range, when known: the SigV4 payload hash needs no pass of its own
        self._position = 0
        self._pace, self._sent = pace, sent
        self.is_sending = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        position = base + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        if position == 0 and self.is_sending:
            self.is_sending = False  # a retry rewinds the body, and may hash it again before sending
            self._sent(0)
        self._position = position
        return position

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._position
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._offset + self._position)
        if len(data) != n:
            raise _Shrank(f"the local file shrank while uploading (read {len(data)} of {n} bytes at "
                            f"{self._offset + self._position})")  # fmt: skip
        self._position += n
        if self.is_sending:
            try:
                self._pace(n)
            except Interrupted as exc:
                raise _StopPart(str(exc)) from None
            self._sent(self._position)
        return data

    def close(self) -> None:
        """The descriptor belongs to the upload, which closes it."""

    def __repr__(self) -> str:
        return f"<PartBody {self._offset}+{self._length}>"


class PartProgress(UploadProgress):
    """`UploadProgress` whose parts are `PartBody` views of the file instead of bytes."""

    def part_body(self, number: int, fd: int, offset: int, length: int, sha256: bytes | None = None) -> PartBody:
        """The paced body of part `number`: `length` bytes of `fd` from `offset` (whose SHA-256 digest is `sha256`)."""
        return PartBody(fd, offset, length, self._pace, lambda n: self._sent(number, n, n == length), sha256)


def b64(digest: bytes) -> str:
    """A digest as S3's checksum headers carry it."""
    return base64.b64encode(digest).decode()


def range_digests(fd: int, offset: int, length: int, check_stop: Callable[[], None] | None = None,
                  md5: bool = False) -> tuple[bytes, str | None]:  # fmt: skip
    """(SHA-256 digest, hex MD5 or None) of [offset, offset + length) of `fd`, read `HASH_CHUNK` at a time.

    Raises `ShortRead` if the file ends first; `check_stop` is called between reads.
    """
    sha = hashlib.sha256()
    digest_md5 = hashlib.md5(usedforsecurity=False) if md5 else None
    buffer = bytearray(min(HASH_CHUNK, max(length, 1)))
    view = memoryview(buffer)
    done = 0
    while done < length:
        if check_stop is not None:
            check_stop()
        want = min(len(buffer), length - done)
        got = os.preadv(fd, [view[:want]], offset + done)
        if got <= 0:
            raise ShortRead(f"the local file shrank while uploading (ended {length - done} bytes before "
                            f"{offset + length})")  # fmt: skip
        sha.update(view[:got])
        if digest_md5 is not None:
            digest_md5.update(view[:got])
        done += got
    view.release()
    return sha.digest(), digest_md5.hexdigest() if digest_md5 else None


def file_part_checksums(source: Path, size: int, part_size: int, check_stop: Callable[[], None]
                        ) -> dict[str, dict[str, str]]:  # fmt: skip
    """Each part's base64 SHA-256 computed from the file, by part number, as a checkpoint's `parts` hold them."""
    fd = os.open(source, os.O_RDONLY)
    try:
        starts = range(0, size, part_size)
        return {str(n): {"sha256": b64(range_digests(fd, start, min(part_size, size - start), check_stop)[0])}
                for n, start in enumerate(starts, 1)}  # fmt: skip
    finally:
        os.close(fd)


class KnownPayloadAuth(botocore.auth.S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 SigV4 signer; the payload hash of a `PartBody` read from its start is the SHA-256 it carries."""

    def payload(self, request: Any) -> str:
        body = request.body
        if (isinstance(body, PartBody) and body.sha256 is not None and body.tell() == 0
                and not self._is_streaming_checksum_payload(request) and self._should_sha256_sign_payload(request)):
            return body.sha256.hex()  # what botocore's pass over the body would compute
        result: str = super().payload(request)
        return result


_SIGNER = "spoold-s3v4-known-payload"


def _choose_signer(signing_name: str, context: dict[str, Any], **_kwargs: Any) -> str | None:
    """Where botocore's own choice (`set_operation_specific_signer`, the first to answer for S3) is plain SigV4."""
    if context.get("is_presign_request"):
        return None
    chosen = botocore.handlers.set_operation_specific_signer(context=context, signing_name=signing_name)
    return _SIGNER if chosen == "s3v4" else None


def _start_part_pacing(request: Any, **_kwargs: Any) -> None:
    body = request.body
    body = getattr(body, "_raw", body)  # botocore's aws-chunked wrapper around the body
    if isinstance(body, PartBody):
        body.is_sending = True


def enable_part_pacing(client: Any) -> None:
    """Make `PartBody` bodies of `client`'s requests pace themselves from the moment they are sent, and have
    UploadPart and PutObject signed with the payload hash a `PartBody` knows."""
    client.meta.events.register_last("before-send.s3", _start_part_pacing, unique_id="spoold-part-body")
    botocore.auth.AUTH_TYPE_MAPS.setdefault(_SIGNER, KnownPayloadAuth)
    for operation in ("UploadPart", "PutObject"):
        client.meta.events.register_first(f"choose-signer.s3.{operation}", _choose_signer,
                                          unique_id=f"spoold-known-payload-{operation}")  # fmt: skip


@contextlib.contextmanager
def part_exceptions() -> Iterator[None]:
    """Around a client call with a `PartBody`: a stop inside the send comes out as `Interrupted`, a file that
    shrank as `ShortRead`."""
    try:
        yield
    except _StopPart as exc:
        raise Interrupted(str(exc) or "the daemon is stopping") from None
    except _Shrank as exc:
        raise ShortRead(str(exc)) from None
