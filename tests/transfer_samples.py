"""(monotonic time, bytes done) points of one transfer, for checking a `rate:` cap (tests and bench/rate.py)."""

from __future__ import annotations

import threading
import time


class TransferSamples:
    def __init__(self) -> None:
        self.points: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def add(self, done: int, _total: int | None = 0) -> None:
        """A transfer's progress callback."""
        with self.lock:
            self.points.append((time.monotonic(), done))

    def achieved_bps(self) -> float:
        points = sorted(p for p in self.points if p[1] > 0)
        # The first time the last count was seen: what follows it is the far side verifying, not the transfer.
        last = min((p for p in points if p[1] == points[-1][1]), default=None) if points else None
        if last is None or last[0] <= points[0][0]:
            return float("nan")
        # From the first piece that arrived to the last: the first piece is the bucket's burst, not paced.
        return (last[1] - points[0][1]) / (last[0] - points[0][0])

    def max_second_bytes(self) -> int:
        """The most bytes moved within any one second."""
        points = sorted(self.points)
        best, first = 0, 0
        for last in range(len(points)):
            while points[last][0] - points[first][0] > 1.0:
                first += 1
            best = max(best, points[last][1] - points[first][1])
        return best
