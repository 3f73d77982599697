"""Pacing S3 uploads: a request body that waits under the transfer's caps as it is sent, not as it is hashed.

botocore reads an upload's body more than once: to sign it (SigV4 over plain
HTTP hashes the payload), sometimes to checksum it, and then to send it. Only
the sending may be paced, else a capped upload would move at a fraction of its
cap. So a `PacedBody` starts pacing only when botocore's `before-send` event
says the request is about to go on the wire (the trick s3transfer's bandwidth
limiter uses), and then every read waits for the transfer's `pace`.

A stop (`Interrupted` from `pace`) must not be taken for a network error and
retried with backoff: inside the send it travels as `_StopSending`, which is no
`Exception`, so neither urllib3 nor botocore catch it; `stop_as_interrupted`
turns it back into `Interrupted` around the client call.

As the bodies are read for sending, `UploadProgress` reports the bytes on the
wire, so a capped part of 64 MiB does not leave the progress still for a minute.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from spoold.errors import Interrupted

_REPORT_SECONDS = 0.2


class _StopSending(BaseException):
    """Raised from a body's read while the daemon stops; passes through botocore's retry loop untouched."""


class PacedBody(io.BytesIO):
    """`data` as an upload body whose reads, once sending, wait for `pace(n)` (which raises `Interrupted` on stop).

    `sent(n)` hears how far into `data` the sending is (0 again when a retry rewinds it).
    """

    def __init__(self, data: bytes, pace: Callable[[int], None], sent: Callable[[int], None]) -> None:
        super().__init__(data)
        self._pace = pace
        self._sent = sent
        self.is_sending = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.is_sending and data:
            try:
                self._pace(len(data))
            except Interrupted as exc:
                raise _StopSending(str(exc)) from None
            self._sent(self.tell())
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if offset == 0 and whence == io.SEEK_SET and self.is_sending:
            self.is_sending = False  # a retry rewinds the body, and may hash it again before sending
            self._sent(0)
        return super().seek(offset, whence)


class UploadProgress:
    """An upload's bytes on the wire, for `progress(done, size)`: finished parts plus what each part in flight sent.

    Thread-safe (parts go up in parallel); reports at most every `_REPORT_SECONDS`, and at every finished part.
    """

    def __init__(self, done: int, size: int, progress: Callable[[int, int], None], pace: Callable[[int], None]) -> None:
        self._lock = threading.Lock()
        self._done, self._size = done, size
        self._progress, self._pace = progress, pace
        self._partial: dict[int, int] = {}
        self._reported_at = 0.0

    def body(self, number: int, data: bytes) -> PacedBody:
        """The paced body of part `number`."""
        return PacedBody(data, self._pace, lambda n: self._sent(number, n, n == len(data)))

    def finished(self, number: int, length: int) -> None:
        with self._lock:
            self._partial.pop(number, None)
            self._done += length
            done = self._done + sum(self._partial.values())
        self._progress(done, self._size)

    def _sent(self, number: int, n: int, is_whole: bool) -> None:
        with self._lock:
            self._partial[number] = n
            now = time.monotonic()
            if now - self._reported_at < _REPORT_SECONDS and not is_whole:
                return
            self._reported_at = now
            done = self._done + sum(self._partial.values())
        self._progress(done, self._size)


def _start_pacing(request: Any, **_kwargs: Any) -> None:
    body = request.body
    body = getattr(body, "_raw", body)  # botocore's aws-chunked wrapper around the body
    if isinstance(body, PacedBody):
        body.is_sending = True


def enable_pacing(client: Any) -> None:
    """Make `PacedBody` bodies of `client`'s requests pace themselves from the moment they are sent."""
    client.meta.events.register_last("before-send.s3", _start_pacing, unique_id="spoold-paced-body")


@contextlib.contextmanager
def stop_as_interrupted() -> Iterator[None]:
    """Around a client call with a `PacedBody`: a stop inside the send comes out as `Interrupted`."""
    try:
        yield
    except _StopSending as exc:
        raise Interrupted(str(exc) or "the daemon is stopping") from None
