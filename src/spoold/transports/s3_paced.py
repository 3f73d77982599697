"""An S3 upload's progress: the bytes on the wire, reported as they are sent, not as they are hashed.

As the bodies (`s3_parts.PartBody`) are read for sending, `UploadProgress` reports the bytes on the wire,
so a capped part of 64 MiB does not leave the progress still for a minute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_REPORT_SECONDS = 0.2


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
