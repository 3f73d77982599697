"""What one transfer is given: progress, a durable checkpoint, the stop flag and its pace (`rate:`).

Transports call `pace(n)` before (or as) they move each piece of `chunk_bytes(...)`
bytes: it waits under the step's and the spool's caps and raises `Interrupted` when
the daemon stops, so every transfer notices a stop within one piece. They never
learn where a cap came from: the step's context builds the `Limiter`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from spoold.ratelimit import UNLIMITED, Limiter


@dataclasses.dataclass
class TransferContext:
    """What a transfer may use: progress, a durable checkpoint, the stop flag, and the limiter that paces it."""

    progress: Callable[[int, int], None]
    checkpoint: dict[str, Any]
    save_checkpoint: Callable[[], None]
    check_stop: Callable[[], None]
    limiter: Limiter = UNLIMITED

    def pace(self, n: int) -> None:
        """Wait until `n` more bytes may move; raise `Interrupted` if the daemon is stopping."""
        self.limiter.acquire(n)
        self.check_stop()

    def chunk_bytes(self, default: int) -> int:
        """How much to move between two `pace` calls: `default`, or less when a cap's burst is smaller."""
        return self.limiter.piece_bytes(default)

    def sub(self, progress: Callable[[int, int], None], checkpoint: dict[str, Any]) -> TransferContext:
        """The context of one part of this transfer (a file of a folder): its own progress and checkpoint."""
        return dataclasses.replace(self, progress=progress, checkpoint=checkpoint)
