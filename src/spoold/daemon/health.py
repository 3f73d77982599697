"""health.json, metrics.prom and the one-line STATUS summary, all from the same counts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold import __version__
from spoold.daemon.metrics import Metrics, family, labels
from spoold.daemon.sidecar import STATES
from spoold.fsio import encode_json, now_iso, write_bytes_atomic
from spoold.redact import redact

if TYPE_CHECKING:
    from spoold.daemon.queues import QueueBook

HEALTH_SCHEMA = "spoold.health/1"
# States in which a worker may hold an item and say so itself.
_REPORTED_BY_WORKER = ("running", "waiting")


def live_counts(book: QueueBook) -> dict[str, int]:
    """The book's counts by state, each item a worker holds counted as running unless it reported waiting.

    The recorded state is the last one a worker reported, so an item dispatched in this tick still reads
    `queued` (or `retrying`) until its worker's first report: the summary sent at the end of the tick said
    `0 running, 1 queued` for a step that had started, and any report lost or late would keep it so. Whether
    a worker holds the item is the truth.
    """
    counts = dict(book.counts())
    for item in book.running:
        state = book.states.get(item)
        if state in _REPORTED_BY_WORKER:
            continue
        if state is not None and counts.get(state, 0) > 0:
            counts[state] -= 1
        counts["running"] = counts.get("running", 0) + 1
    return {state: n for state, n in counts.items() if n}


@dataclasses.dataclass
class NodeStatus:
    """What the main loop knows right now, rendered three ways."""

    started: str
    counts: dict[str, dict[str, int]]
    free_bytes: int
    min_free_bytes: int
    is_intake_paused: bool
    is_ready: bool
    last_error: dict[str, Any] | None
    spool: Path
    pause_reason: str | None = None
    # Per shared queue: its source, this node's name, the items it holds, and its claims counted by result.
    shared: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Written by a clean stop (daemon/tally.py): when, and each queue's status folder mtime at that moment.
    stopped: dict[str, Any] | None = None

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(STATES, 0)
        for by_state in self.counts.values():
            for state, n in by_state.items():
                totals[state] = totals.get(state, 0) + n
        return totals

    def status_line(self) -> str:
        """`3 running, 12 queued, 0 failed, disk ok`."""
        t = self.totals()
        line = f"{t['running']} running, {t['queued'] + t['retrying']} queued, {t['failed']} failed"
        if t["waiting"]:
            line = f"{t['running']} running, {t['waiting']} waiting, " + line.split(", ", 1)[1]
        disk = "disk ok"
        if self.is_intake_paused:
            low = self.pause_reason is None or self.pause_reason.startswith("free space")
            disk = f"disk low ({_gib(self.free_bytes)} free)" if low else f"disk unusable ({self.pause_reason})"
            disk += ", intake paused"
        return f"{line}, {disk}"

    def health_document(self) -> dict[str, Any]:
        return {
            "schema": HEALTH_SCHEMA,
            "pid": os.getpid(),
            "version": __version__,
            "started": self.started,
            "heartbeat": now_iso(),
            "ready": self.is_ready,
            "queues": {name: dict(by_state) for name, by_state in self.counts.items()},
            "disk": {
                str(self.spool): {"free_bytes": self.free_bytes, "min_free_bytes": self.min_free_bytes,
                                  "paused_because": self.pause_reason},
                "intake_paused": self.is_intake_paused,
            },
            "status": self.status_line(),
            "last_error": self.last_error,
            **({"shared": self.shared} if self.shared else {}),
            **({"stopped": self.stopped} if self.stopped else {}),
        }

    def metrics_text(self, metrics: Metrics | None = None) -> str:
        lines = family("spoold_items", "gauge", "Items by queue and state.", [
            f"spoold_items{labels(queue=queue, state=state)} {by_state.get(state, 0)}"
            for queue, by_state in sorted(self.counts.items()) for state in STATES
        ])  # fmt: skip
        lines += [
            *family("spoold_spool_free_bytes", "gauge", "Free bytes on the spool's filesystem.",
                    [f"spoold_spool_free_bytes {self.free_bytes}"]),
            *family("spoold_intake_paused", "gauge", "1 while intake is paused for lack of disk space.",
                    [f"spoold_intake_paused {int(self.is_intake_paused)}"]),
            *family("spoold_ready", "gauge", "1 once the first scan is done.", [f"spoold_ready {int(self.is_ready)}"]),
        ]  # fmt: skip
        if self.shared:
            shared = sorted(self.shared.items())
            lines += [
                *family("spoold_claims_total", "counter", "Claims on shared items by result, since spoold started.",
                        (f"spoold_claims_total{labels(queue=q, result=r)} {n}"
                         for q, info in shared for r, n in sorted(info["claims"].items()))),
                *family("spoold_shared_items", "gauge", "Items of a shared queue that this node holds now.",
                        (f"spoold_shared_items{labels(queue=q)} {info['held']}" for q, info in shared)),
            ]  # fmt: skip
        if metrics is not None:
            lines += metrics.lines()
        return redact("\n".join(lines)) + "\n"


def write_health(status: NodeStatus, health_path: Path, metrics_path: Path, metrics: Metrics | None = None) -> None:
    # The textfile collector reads *.prom whole; write it by rename too. It goes first: whoever sees a new
    # health.json finds metrics at least as new.
    write_bytes_atomic(metrics_path, status.metrics_text(metrics).encode())
    write_bytes_atomic(health_path, redact(encode_json(status.health_document()).decode()).encode())


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"
