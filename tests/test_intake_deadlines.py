"""Intake keeps its candidates' deadlines in a heap: the loop asks for the next one after every wake, and
with 4,096 entries tracked in a burst, a walk over all of them each time cost more than the claims."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spoold.daemon import intake as intake_module
from spoold.daemon.config import parse_config
from spoold.daemon.intake import Intake
from spoold.daemon.layout import SpoolLayout


def make_intake(tmp_path: Path, settle: str) -> Intake:
    config = parse_config(json.dumps({"spool": str(tmp_path / "spool"), "queues": {
        "q": {"settle": settle, "chain": ["checksum"]}}}), "<test>")  # fmt: skip
    layout = SpoolLayout(config.spool, config.queues)
    layout.ensure()
    return Intake(config.queues["q"], layout.queues["q"].inbox)


def test_due_entries_come_earliest_first_within_the_limit(tmp_path: Path) -> None:
    intake = make_intake(tmp_path, "10s")
    for n in range(50):
        (intake.inbox / f"f{n:02d}").write_bytes(b"x")
    for n in reversed(range(50)):  # noticed latest-first: f49 is due first
        intake.notice(intake.inbox / f"f{n:02d}", 1000.0 + (49 - n), is_landed=True)
    assert intake.next_deadline() == 1010.0
    assert intake.due(1009.9) == []
    first = intake.due(1030.0, limit=5)
    assert [a.entry for a in first] == ["f49", "f48", "f47", "f46", "f45"]
    assert intake.next_deadline() == 1015.0
    rest = intake.due(2000.0)
    assert len(rest) == 45 and intake.next_deadline() is None and not intake.candidates


def test_an_entry_that_changed_is_due_again_one_settle_later(tmp_path: Path) -> None:
    intake = make_intake(tmp_path, "2s")
    path = intake.inbox / "growing.bin"
    path.write_bytes(b"x")
    intake.notice(path, 100.0, is_landed=True)
    with open(path, "ab") as stream:
        stream.write(b"more")
    os.utime(path, ns=(1, 1))  # a different mtime whatever the clock's resolution
    assert intake.due(103.0) == []
    assert intake.next_deadline() == 105.0
    assert [a.entry for a in intake.due(105.0)] == ["growing.bin"]


def test_an_entry_whose_check_raised_stays_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    intake = make_intake(tmp_path, "0s")
    (intake.inbox / "a").write_bytes(b"x")
    intake.notice(intake.inbox / "a", 10.0, is_landed=True)
    real_lstat = os.lstat

    def failing_lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        raise PermissionError(13, "denied", str(path))

    monkeypatch.setattr(intake_module.os, "lstat", failing_lstat)
    with pytest.raises(PermissionError):
        intake.due(11.0)
    monkeypatch.setattr(intake_module.os, "lstat", real_lstat)
    assert intake.next_deadline() == 10.0
    assert [a.entry for a in intake.due(11.0)] == ["a"]
