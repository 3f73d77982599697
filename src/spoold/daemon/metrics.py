"""The daemon's counters and histograms, and the text exposition format they are written in.

`Metrics` has one owner, the main loop: workers report a step attempt's end by
posting `StepEnded`, queues report an item's end through `QueueBook.on_ended`,
and the loop records both here. Nothing is persisted: the textfile contract
lets counters restart from zero when the daemon restarts, which Prometheus'
`rate()` and `increase()` handle as a counter reset.

The text follows the Prometheus exposition format that node_exporter's textfile
collector parses: each family once, its `# HELP` and `# TYPE` lines first,
label values escaped (backslash, double quote, newline).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping

from spoold.daemon.config import Queue
from spoold.daemon.messages import StepEnded

ITEM_OUTCOMES = ("done", "failed", "rejected")
STEP_RESULTS = ("ok", "retry", "failed")
# The handlers whose attempts move bytes over the network or between filesystems (`spoold_bytes_total`).
TRANSFER_HANDLERS = frozenset({"ship", "fetch", "pull"})
# Steps last from a checksum of a small file (milliseconds) to a `wait` for a remote job (hours).
DURATION_BUCKETS_SECONDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                            7200.0, 21600.0)  # fmt: skip


def escape_label(value: str) -> str:
    """A label value as the exposition format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**pairs: str) -> str:
    """`{queue="a",step="b"}` (in the order given), or nothing without labels."""
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{escape_label(value)}"' for name, value in pairs.items()) + "}"


def number(value: float) -> str:
    """A sample value: integers without a fraction, the infinities as `+Inf`/`-Inf`."""
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


@dataclasses.dataclass
class Histogram:
    """Counts per upper bound (not yet cumulative), plus the sum and count of what was observed."""

    buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * len(DURATION_BUCKETS_SECONDS))
    total_seconds: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(DURATION_BUCKETS_SECONDS, seconds)
        if index < len(self.buckets):
            self.buckets[index] += 1
        self.total_seconds += seconds
        self.count += 1

    def samples(self, name: str, **pairs: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip(DURATION_BUCKETS_SECONDS, self.buckets, strict=True):
            cumulative += n
            lines.append(f"{name}_bucket{labels(**pairs, le=repr(bound))} {cumulative}")
        lines.append(f"{name}_bucket{labels(**pairs, le='+Inf')} {self.count}")
        lines.append(f"{name}_sum{labels(**pairs)} {number(self.total_seconds)}")
        lines.append(f"{name}_count{labels(**pairs)} {self.count}")
        return lines


class Metrics:
    """Everything counted since the daemon started, by queue (and step)."""

    def __init__(self) -> None:
        self.items: Counter[tuple[str, str]] = Counter()
        self.attempts: Counter[tuple[str, str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.last_done: dict[str, float] = {}

    def declare(self, queue: Queue) -> None:
        """Start the queue's series at zero, so the first item's increase is seen by `rate()` too."""
        for outcome in ITEM_OUTCOMES:
            self.items[queue.name, outcome] += 0
        for step in queue.steps:
            for result in STEP_RESULTS:
                self.attempts[queue.name, step.name, result] += 0
            self.durations.setdefault((queue.name, step.name), Histogram())
            if step.handler.name in TRANSFER_HANDLERS:
                self.bytes[queue.name, step.name] += 0

    def item_ended(self, queue: str, outcome: str, at: float) -> None:
        """An item reached `outcome` (done, failed, rejected) at wall-clock time `at`."""
        self.items[queue, outcome] += 1
        if outcome == "done":
            self.last_done[queue] = max(at, self.last_done.get(queue, 0.0))

    def step_ended(self, ended: StepEnded) -> None:
        self.attempts[ended.queue, ended.step, ended.result] += 1
        self.durations.setdefault((ended.queue, ended.step), Histogram()).observe(max(ended.duration_s, 0.0))
        if ended.bytes is not None:
            self.bytes[ended.queue, ended.step] += max(ended.bytes, 0)

    def lines(self) -> list[str]:
        return [
            *family("spoold_items_total", "counter", "Items that ended, by queue and outcome, since spoold started.",
                    (f"spoold_items_total{labels(queue=q, outcome=o)} {n}"
                     for (q, o), n in sorted(self.items.items()))),
            *family("spoold_step_attempts_total", "counter",
                    "Step attempts by queue, step and result (ok, retry, failed) since spoold started.",
                    (f"spoold_step_attempts_total{labels(queue=q, step=s, result=r)} {n}"
                     for (q, s, r), n in sorted(self.attempts.items()))),
            *family("spoold_bytes_total", "counter", "Bytes moved by ship, fetch and pull steps since spoold started.",
                    (f"spoold_bytes_total{labels(queue=q, step=s)} {n}" for (q, s), n in sorted(self.bytes.items()))),
            *family("spoold_step_duration_seconds", "histogram", "How long step attempts took, by queue and step.",
                    _histograms("spoold_step_duration_seconds", self.durations)),
            *family("spoold_last_done_timestamp_seconds", "gauge",
                    "When an item of the queue last ended done (Unix time), since spoold started.",
                    (f"spoold_last_done_timestamp_seconds{labels(queue=q)} {number(round(at, 3))}"
                     for q, at in sorted(self.last_done.items()))),
        ]  # fmt: skip


def _histograms(name: str, histograms: Mapping[tuple[str, str], Histogram]) -> list[str]:
    lines: list[str] = []
    for (queue, step), histogram in sorted(histograms.items()):
        lines += histogram.samples(name, queue=queue, step=step)
    return lines
