"""health.json, metrics.prom and the one-line STATUS summary, all from the same counts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from spoold import __version__
from spoold.daemon.sidecar import STATES
from spoold.fsio import encode_json, now_iso, write_bytes_atomic
from spoold.redact import redact

HEALTH_SCHEMA = "spoold.health/1"


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
        disk = "disk ok" if not self.is_intake_paused else f"disk low ({_gib(self.free_bytes)} free), intake paused"
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
                str(self.spool): {"free_bytes": self.free_bytes, "min_free_bytes": self.min_free_bytes},
                "intake_paused": self.is_intake_paused,
            },
            "status": self.status_line(),
            "last_error": self.last_error,
        }

    def metrics_text(self) -> str:
        lines = [
            "# HELP spoold_items Items by queue and state.",
            "# TYPE spoold_items gauge",
        ]
        for queue, by_state in sorted(self.counts.items()):
            for state in STATES:
                lines.append(f'spoold_items{{queue="{queue}",state="{state}"}} {by_state.get(state, 0)}')
        lines += [
            "# HELP spoold_spool_free_bytes Free bytes on the spool's filesystem.",
            "# TYPE spoold_spool_free_bytes gauge",
            f"spoold_spool_free_bytes {self.free_bytes}",
            "# HELP spoold_intake_paused 1 while intake is paused for lack of disk space.",
            "# TYPE spoold_intake_paused gauge",
            f"spoold_intake_paused {int(self.is_intake_paused)}",
            "# HELP spoold_ready 1 once the first scan is done.",
            "# TYPE spoold_ready gauge",
            f"spoold_ready {int(self.is_ready)}",
        ]
        return redact("\n".join(lines)) + "\n"


def write_health(status: NodeStatus, health_path: Path, metrics_path: Path) -> None:
    write_bytes_atomic(health_path, redact(encode_json(status.health_document()).decode()).encode())
    # The textfile collector reads *.prom whole; write it by rename too.
    write_bytes_atomic(metrics_path, status.metrics_text().encode())


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"
