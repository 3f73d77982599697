"""A step's `history`: how each of its attempts ended, for `spoold status QUEUE ITEM`'s timeline.

One record per ended attempt, oldest first: `{"attempt", "state", "started", "finished", "duration_s",
"bytes", "error"}`, where `state` is `done`, `retrying` (failed, tried again), `failed` (for good) or
`interrupted` (the daemon stopped or crashed; the next start resumes, the attempt is not used up; a crash
leaves no `finished`). `bytes` is the last `bytes_done` the attempt reported, when it counted bytes.
"""

from __future__ import annotations

from typing import Any

from spoold.fsio import now_iso, parse_iso

# A step retried forever cannot grow its sidecar: the last attempts are kept.
HISTORY_ENTRIES = 20


def _progress_bytes(entry: dict[str, Any]) -> int | None:
    """The bytes a step last said it moved, or None when its progress counted no bytes (frames, a log)."""
    progress = entry.get("progress")
    if not isinstance(progress, dict) or progress.get("unit", "bytes") != "bytes":
        return None
    done, total = progress.get("bytes_done"), progress.get("bytes_total")
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        return None
    return done if done or (isinstance(total, int) and total > 0) else None


def record_attempt(entry: dict[str, Any], outcome: str, *, is_crash: bool = False,
                   elapsed: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Append how the step's current attempt ended to its `history` (the last HISTORY_ENTRIES kept).

    `is_crash`: the attempt was found still `running` at the next start; when it ended is not known.
    `elapsed`: the attempt's duration on the monotonic clock, when this process saw it start; the wall-clock
    difference of `started` and `finished` is only the fallback, since a clock step (NTP at boot, a dead RTC)
    between the two made it a year long or zero.
    """
    record: dict[str, Any] = {"attempt": entry.get("attempt", 1), "state": outcome, "started": entry.get("started")}
    if not is_crash:
        record["finished"] = entry.get("finished") or now_iso()
        began, ended = parse_iso(record["started"]), parse_iso(record["finished"])
        if elapsed is not None:
            record["duration_s"] = round(max(elapsed, 0.0), 3)
        elif began is not None and ended is not None:
            record["duration_s"] = round(max(ended - began, 0.0), 3)
    if (moved := _progress_bytes(entry)) is not None:
        record["bytes"] = moved
    if outcome != "done" and isinstance(entry.get("error"), dict) and not is_crash:
        record["error"] = entry["error"]
    history = entry.setdefault("history", [])
    if not isinstance(history, list):
        history = entry["history"] = []
    history.append(record)
    del history[:-HISTORY_ENTRIES]
    return record

