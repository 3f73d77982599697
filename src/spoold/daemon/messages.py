"""What the main loop receives: signal handlers, the watcher and workers post these, nothing else.

Every decision happens in the loop's thread; everyone else only reports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

Verdict = Literal["done", "retry", "failed", "interrupted"]
StepResultKind = Literal["ok", "retry", "failed"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one run of an item's chain ended; `retry_at` (wall-clock seconds) for a retry."""

    verdict: Verdict
    retry_at: float | None = None


@dataclasses.dataclass(frozen=True)
class PathEvent:
    """Something was closed after writing or moved in at `path`, below an inbox."""

    path: Path
    is_landed: bool


@dataclasses.dataclass(frozen=True)
class EventsLost:
    """The kernel's event queue overflowed: every inbox must be scanned."""


@dataclasses.dataclass(frozen=True)
class ClaimLost:
    """A shared queue's claim on a local item is gone (another node has it): stop the item and drop it here."""

    queue: str
    item: str


@dataclasses.dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclasses.dataclass(frozen=True)
class StateChanged:
    """A worker moved an item to another state (running, waiting)."""

    queue: str
    item: str
    state: str


@dataclasses.dataclass(frozen=True)
class ItemFinished:
    """A worker is done with an item for now."""

    queue: str
    item: str
    outcome: Outcome


@dataclasses.dataclass(frozen=True)
class StepEnded:
    """One attempt of a step ended (an attempt stopped by a shutdown is not reported: it did not end).

    `bytes`: what a transfer step (ship, fetch, pull) moved in this attempt; None for other steps.
    """

    queue: str
    step: str
    result: StepResultKind
    duration_s: float
    bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class ItemAdopted:
    """A worker handed a new item over to a local queue (forward, fetch, pull)."""

    queue: str
    item: str


Message = PathEvent | EventsLost | SignalReceived | StateChanged | StepEnded | ItemFinished | ItemAdopted | ClaimLost
