"""sd_notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING. A silent no-op outside systemd."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 2.0


class Notifier:
    """Speaks the sd_notify datagram protocol on `$NOTIFY_SOCKET`, read when created."""

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET", "")
        if self._address.startswith("@"):
            self._address = "\0" + self._address[1:]
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Bounded: a receiver that stops reading (its queue holds ~10 datagrams) must not stall the loop.
            self._socket.setblocking(False)
        self.watchdog_interval_seconds = self._watchdog_interval()
        self._last_status = ""

    @staticmethod
    def _watchdog_interval() -> float | None:
        """Half of `$WATCHDOG_USEC`, when the watchdog is meant for this process."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000

    @property
    def is_enabled(self) -> bool:
        return self._socket is not None

    def send(self, *assignments: str, wait: bool = True) -> bool:
        """True when the datagram went out (systemd may still ignore it); `wait=False` never blocks."""
        if self._socket is None:
            return False
        data, deadline = "\n".join(assignments).encode(), time.monotonic() + SEND_TIMEOUT_SECONDS
        try:
            while True:
                try:
                    self._socket.sendto(data, self._address)
                    break
                except BlockingIOError:
                    # The receiver's queue is full. (poll() cannot tell when an unconnected socket may send.)
                    if not wait or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        # Remembered only once sent: a summary lost to a busy socket goes out again on the next tick.
        if text != self._last_status and self.send(f"STATUS={text}", wait=False):
            self._last_status = text

    def watchdog(self) -> None:
        if self.watchdog_interval_seconds is not None:
            self.send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
