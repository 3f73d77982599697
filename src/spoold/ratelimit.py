"""Bandwidth caps: token buckets, like rsync's and rclone's `--bwlimit`, for `rate:` on a step and on the spool.

A `TokenBucket` holds bytes that may move now; it refills at its rate and holds at
most `BURST_SECONDS` worth, so a transfer that was idle (or waited on a slow
server) never bursts far above the cap: over any stretch of T seconds no more
than `rate x (T + BURST_SECONDS)` bytes pass. A caller reserves what it is about
to move and waits until the bucket has paid for it (a reservation may leave the
bucket in debt, which the callers after it wait out, so threads sharing a
bucket share its rate fairly).

A `Limiter` is what one transfer uses: the step's own bucket (a step's `rate:`)
and the daemon's shared one (the top-level `rate:`), the stricter winning. It
waits in short slices on the stop event, so `systemctl stop` interrupts a
throttled transfer at once, and it tells transports how large a piece to move
between waits (`piece_bytes`), so a piece never outgrows the burst.

The daemon-wide bucket lives here, one per spool in this process (`shared_bucket`):
it outlives a reload (SIGHUP), which only changes its rate, so transfers started
before and after a reload still share one cap.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from spoold.errors import Interrupted

# How much a bucket may hold, in seconds of its rate: small, so a burst stays well under twice the cap in any second.
BURST_SECONDS = 0.2
# A bucket never holds less than this, so a very low rate still moves whole network packets.
MIN_BURST_BYTES = 4 << 10
# The longest single sleep while waiting for tokens: a stop or a new rate is noticed within it.
WAIT_SLICE_SECONDS = 0.1


class TokenBucket:
    """Bytes that may move now, refilled at `rate_bps` up to `burst_bytes`; thread-safe, on the monotonic clock."""

    def __init__(self, rate_bps: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._rate, self._burst = _rate_and_burst(rate_bps)
        self._tokens = float(self._burst)
        self._stamp = clock()

    @property
    def rate_bps(self) -> int:
        return self._rate

    @property
    def burst_bytes(self) -> int:
        return self._burst

    def set_rate(self, rate_bps: int) -> None:
        """Change the rate (a reloaded config); what the bucket holds is cut to the new burst."""
        rate, burst = _rate_and_burst(rate_bps)
        with self._lock:
            self._rate, self._burst = rate, burst
            self._tokens = min(self._tokens, float(burst))

    def reserve(self, n: int) -> float:
        """Take `n` bytes' worth of tokens; return how many seconds to wait before moving them (0 when at once)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self._burst), self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class Limiter:
    """The pace of one transfer: every bucket in `buckets` pays for each piece; `stop` interrupts the wait.

    With no buckets it never waits (and costs one comparison per piece).
    """

    def __init__(self, buckets: Sequence[TokenBucket] = (), stop: threading.Event | None = None) -> None:
        self._buckets = tuple(buckets)
        self._stop = stop

    @property
    def is_limited(self) -> bool:
        return bool(self._buckets)

    def piece_bytes(self, default: int) -> int:
        """How much a transfer should move between two `acquire` calls: `default`, or less under a cap."""
        if not self._buckets:
            return default
        return max(1, min(default, *(b.burst_bytes for b in self._buckets)))

    def acquire(self, n: int) -> None:
        """Wait until `n` bytes may move under every cap; `Interrupted` if the daemon stops meanwhile."""
        if not self._buckets or n <= 0:
            return
        piece = self.piece_bytes(n)
        left = n
        while left > 0:
            size = min(piece, left)
            for bucket in self._buckets:
                self._wait(bucket.reserve(size))
            left -= size

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            step = min(remaining, WAIT_SLICE_SECONDS)
            if self._stop is None:
                time.sleep(step)
            elif self._stop.wait(step):
                raise Interrupted("the daemon is stopping")


def _rate_and_burst(rate_bps: int) -> tuple[int, int]:
    if rate_bps <= 0:
        raise ValueError(f"a rate must be more than zero bytes per second, got {rate_bps}")
    return rate_bps, max(int(rate_bps * BURST_SECONDS), MIN_BURST_BYTES)


UNLIMITED = Limiter()

_SHARED: dict[str, TokenBucket] = {}
_SHARED_LOCK = threading.Lock()


def shared_bucket(spool: Path, rate_bps: int | None) -> TokenBucket | None:
    """The bucket every transfer of the daemon serving `spool` shares (the top-level `rate:`), or None without one.

    Made on first use and kept for the life of the process; a reload with another rate changes it in place.
    """
    if rate_bps is None:
        return None
    key = os.path.abspath(spool)
    with _SHARED_LOCK:
        bucket = _SHARED.get(key)
        if bucket is None:
            bucket = _SHARED[key] = TokenBucket(rate_bps)
        elif bucket.rate_bps != rate_bps:
            bucket.set_rate(rate_bps)
        return bucket
