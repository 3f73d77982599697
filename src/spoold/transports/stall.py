"""A watch on one SFTP upload: the connection is closed when no request went out for `seconds`.

paramiko's packetizer retries a send on a full socket for as long as the transport is open, so an upload
whose link went silent (packets dropped, no reset) sits in `write` until TCP itself gives up, a quarter
of an hour later. The channel's timeout only covers waits for the SSH window, which a small socket buffer
never reaches. Closing the transport makes the blocked send fail at once; the caller reports a timeout.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import paramiko


class StallWatch:
    """`touch()` after each request sent; `pause()` while the caller waits on purpose (a rate cap)."""

    def __init__(self, ssh: paramiko.Transport, seconds: float) -> None:
        self.ssh, self.seconds = ssh, seconds
        self.fired = False
        self._last: float | None = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sftp-stall-watch", daemon=True)

    def touch(self) -> None:
        self._last = time.monotonic()

    def pause(self) -> None:
        self._last = None

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self.seconds / 4)):
            last = self._last
            if last is not None and time.monotonic() - last > self.seconds:
                self.fired = True
                self.ssh.close()
                return

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join(timeout=5)
