"""Clock steps (torture/clock.py): retention and step durations judge time on the monotonic clock."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from spoold.daemon import retention
from spoold.daemon.attempts import record_attempt
from spoold.daemon.config import Queue, parse_config
from spoold.daemon.layout import SpoolLayout
from spoold.fsio import now_iso

YEAR = 365 * 86400.0


def _done_items(tmp_path: Path, count: int) -> tuple[SpoolLayout, Queue]:
    config = parse_config(json.dumps({"spool": str(tmp_path / "spool"), "queues": {
        "q": {"keep": {"done": "7d", "failed": "7d"}, "chain": ["checksum"]}}}), "<test>")  # fmt: skip
    layout = SpoolLayout(config.spool, config.queues)
    layout.ensure()
    folders = layout.queues["q"]
    for i in range(count):
        name = f"item{i}"
        (folders.done / name).mkdir()
        (folders.done / name / name).write_bytes(b"x")
        doc = {"schema": "spoold.status/1", "queue": "q", "item": name, "original_name": name, "kind": "file",
               "state": "done", "steps": [], "updated": now_iso(), "created": now_iso()}  # fmt: skip
        (folders.status / f"{name}.json").write_text(json.dumps(doc))
        os.utime(folders.status / f"{name}.json", (time.time(), time.time()))  # as the (patched) clock says
    return layout, config.queues["q"]


def test_a_clock_stepped_a_year_forward_expires_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout, queue = _done_items(tmp_path, 5)
    folders = layout.queues["q"]
    clock, pruner = retention.WallClock(), retention.Pruner(folders, lambda name, state: None)
    clock.sample()  # the daemon's first tick, at the real time
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + YEAR)
    assert pruner.prune(queue, clock) == 0, "a year-forward clock step expired everything"
    assert len(list(folders.status.glob("*.json"))) == 5 and len(list(folders.done.iterdir())) == 5
    assert len(clock.stretches) == 2, "the step was not recorded"
    # Once the items are older than keep.done by the monotonic clock, they go as usual.
    mono = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: mono() + 8 * 86400.0)
    monkeypatch.setattr(time, "time", lambda: real() + YEAR + 8 * 86400.0)
    assert pruner.prune(queue, clock) == 5


def test_a_clock_stepped_back_keeps_nothing_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Items written after a backward step are judged by the clock they were written with."""
    layout, queue = _done_items(tmp_path, 0)
    folders = layout.queues["q"]
    clock, pruner = retention.WallClock(), retention.Pruner(folders, lambda name, state: None)
    clock.sample()
    real, mono = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real() - YEAR)
    clock.sample()
    _done_items(tmp_path, 3)  # written with the stepped-back clock: dated a year ago
    assert pruner.prune(queue, clock) == 0, "items written a moment ago (by the clock then) were pruned"
    monkeypatch.setattr(time, "monotonic", lambda: mono() + 8 * 86400.0)
    monkeypatch.setattr(time, "time", lambda: real() - YEAR + 8 * 86400.0)
    assert pruner.prune(queue, clock) == 3


def test_a_large_status_folder_is_read_a_slice_per_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout, queue = _done_items(tmp_path, 25)
    folders = layout.queues["q"]
    monkeypatch.setattr(retention, "SLICE", 10)
    clock, pruner = retention.WallClock(), retention.Pruner(folders, lambda name, state: None)
    seen: list[int] = []
    real = retention._sidecar_entries

    def counted(folders_: object) -> object:
        for entry in real(folders):
            seen.append(1)
            yield entry

    monkeypatch.setattr(retention, "_sidecar_entries", counted)
    mono, now = time.monotonic, time.time
    monkeypatch.setattr(time, "monotonic", lambda: mono() + 8 * 86400.0)
    monkeypatch.setattr(time, "time", lambda: now() + 8 * 86400.0)
    assert [pruner.prune(queue, clock) for _ in range(3)] == [10, 10, 5]
    assert len(seen) == 25, "a rescan read more than its slice"


def test_a_sidecar_dated_in_the_future_ages_on_the_monotonic_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, queue = _done_items(tmp_path, 2)
    folders = layout.queues["q"]
    real, mono = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real() - YEAR)  # the clock stepped a year back before we started
    clock, pruner = retention.WallClock(), retention.Pruner(folders, lambda name, state: None)
    assert pruner.prune(queue, clock) == 0
    monkeypatch.setattr(time, "monotonic", lambda: mono() + 8 * 86400.0)
    monkeypatch.setattr(time, "time", lambda: real() - YEAR + 8 * 86400.0)
    assert pruner.prune(queue, clock) == 2


def test_duration_is_the_monotonic_elapsed_time_not_the_wall_clock_difference() -> None:
    entry = {"attempt": 1, "started": now_iso(time.time() - YEAR)}  # the clock stepped a year forward mid-step
    assert record_attempt(entry, "done", elapsed=3.25)["duration_s"] == 3.25
    entry = {"attempt": 1, "started": now_iso(time.time() + YEAR)}  # ... or back: never negative, never zero
    assert record_attempt(entry, "done", elapsed=2.0)["duration_s"] == 2.0
    assert record_attempt({"attempt": 1, "started": now_iso(time.time() + YEAR)}, "done")["duration_s"] == 0.0
