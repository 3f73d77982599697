"""Writers into one folder share its fsync, and none returns before a folder fsync that began after its rename.

`fsio.fsync_dir` is a group commit: while one fsync of a folder runs, writers whose rename came after it began
wait, and one of them runs the next fsync for all. These tests watch the real calls (os.replace, os.fsync on
a folder) of real threads writing real files; where an order must be forced, a folder fsync is held until the
other writers are known to be waiting, never by sleeping.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold import fsio
from spoold.daemon.sidecar import Sidecar
from tests.conftest import DaemonProcess, sidecar_state, wait_for

TIMEOUT = 20.0


class Calls:
    """Every rename and folder fsync of the test, numbered in the order they happened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.number = 0
        self.renamed: dict[str, int] = {}  # target -> when its rename returned
        self.folder_syncs: list[tuple[int, int]] = []  # (began, ended)
        self.folder_sync_began = 0
        # Called at the start of each folder fsync with its ordinal (1, 2, ...): may hold it or raise.
        self.on_folder_sync: Callable[[int], None] = lambda ordinal: None
        real_replace, real_fsync = os.replace, os.fsync

        def replace(source: Any, target: Any) -> None:
            real_replace(source, target)
            with self.changed:
                self.renamed[os.fspath(target)] = self._next()
                self.changed.notify_all()

        def fsync(fd: int) -> None:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                real_fsync(fd)
                return
            with self.changed:
                began = self._next()
                self.folder_sync_began += 1
                ordinal = self.folder_sync_began
                self.changed.notify_all()
            self.on_folder_sync(ordinal)
            real_fsync(fd)
            with self.changed:
                self.folder_syncs.append((began, self._next()))

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)

    def _next(self) -> int:
        self.number += 1
        return self.number

    def now(self) -> int:
        with self.lock:
            return self._next()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, TIMEOUT), f"timed out waiting for {what}"

    def check_covered(self, target: Path, returned: int) -> None:
        """The write of `target` returned after a folder fsync that began after its rename and ended before."""
        renamed = self.renamed[str(target)]
        assert any(renamed < began and ended < returned for began, ended in self.folder_syncs), (
            f"{target.name}: renamed at {renamed}, returned at {returned}, folder fsyncs {self.folder_syncs}")


class CountingCondition(threading.Condition):
    """fsio's condition, counting who waits on it: `waiting` writers are inside fsync_dir, behind an fsync."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waiting = 0
        self.seen = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        with self.seen:
            self.waiting += 1
            self.seen.notify_all()
        try:
            return super().wait(timeout)
        finally:
            with self.seen:
                self.waiting -= 1

    def until_waiting(self, count: int) -> None:
        with self.seen:
            assert self.seen.wait_for(lambda: self.waiting >= count, TIMEOUT), f"{count} writers never waited"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch)


@pytest.fixture
def condition(monkeypatch: pytest.MonkeyPatch) -> CountingCondition:
    counting = CountingCondition()
    monkeypatch.setattr(fsio, "_flushes_changed", counting)
    return counting


def start_write(calls: Calls, path: Path, data: bytes, results: dict[Path, Any]) -> threading.Thread:
    """A thread writing `path`; `results[path]` becomes the number when it returned, or what it raised."""

    def write() -> None:
        try:
            fsio.write_bytes_atomic(path, data)
            results[path] = calls.now()
        except OSError as exc:
            results[path] = exc

    thread = threading.Thread(target=write, name=f"write {path.name}")
    thread.start()
    return thread


def hold_first_folder_sync(calls: Calls) -> threading.Event:
    """The first folder fsync waits until the returned event is set."""
    release = threading.Event()

    def hold(ordinal: int) -> None:
        if ordinal == 1:
            release.wait(TIMEOUT)

    calls.on_folder_sync = hold
    return release


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f"{thread.name} never returned"


def test_concurrent_writes_each_return_after_a_folder_fsync_begun_after_their_rename(
    tmp_path: Path, calls: Calls
) -> None:
    results: dict[Path, Any] = {}
    paths = [tmp_path / f"s{n}.json" for n in range(48)]

    def writer(mine: list[Path]) -> None:
        for path in mine:
            fsio.write_bytes_atomic(path, path.name.encode())
            results[path] = calls.now()

    threads = [threading.Thread(target=writer, args=(paths[n::6],)) for n in range(6)]
    for thread in threads:
        thread.start()
    join(threads)
    for path in paths:
        assert path.read_bytes() == path.name.encode()
        calls.check_covered(path, results[path])
    assert len(calls.folder_syncs) <= len(paths)
    assert not fsio._flushes, "a folder's entry outlived its last writer (the registry would grow per folder)"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(fsio.TEMP_SUFFIX)]


def test_a_write_renamed_during_a_folder_fsync_waits_for_the_next_one(
    tmp_path: Path, calls: Calls, condition: CountingCondition
) -> None:
    release = hold_first_folder_sync(calls)
    results: dict[Path, Any] = {}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    threads = [start_write(calls, first, b"1", results)]
    calls.wait(lambda: calls.folder_sync_began == 1, "the first write's folder fsync")
    threads.append(start_write(calls, second, b"2", results))
    condition.until_waiting(1)  # renamed while the first fsync runs, and waiting behind it
    assert second not in results, "returned on a folder fsync that began before its rename"
    release.set()
    join(threads)
    assert len(calls.folder_syncs) == 2
    calls.check_covered(first, results[first])
    calls.check_covered(second, results[second])
    (_, first_ended), (second_began, _) = calls.folder_syncs
    assert calls.renamed[str(second)] < first_ended < second_began


def leader_and_followers(tmp_path: Path, calls: Calls, condition: CountingCondition, release: threading.Event,
                         count: int) -> tuple[Path, list[Path], dict[Path, Any]]:  # fmt: skip
    """A leader's write whose folder fsync is held, `count` writes that come in meanwhile, then the release:
    the paths, and what each write returned or raised."""
    results: dict[Path, Any] = {}
    leader = tmp_path / "leader.json"
    threads = [start_write(calls, leader, b"x", results)]
    calls.wait(lambda: calls.folder_sync_began == 1, "the leader's folder fsync")
    followers = [tmp_path / f"f{n}.json" for n in range(count)]
    threads += [start_write(calls, path, b"y", results) for path in followers]
    condition.until_waiting(len(followers))
    release.set()
    join(threads)
    return leader, followers, results


def test_writers_who_came_in_during_one_folder_fsync_share_the_next(
    tmp_path: Path, calls: Calls, condition: CountingCondition
) -> None:
    release = hold_first_folder_sync(calls)
    leader, followers, results = leader_and_followers(tmp_path, calls, condition, release, 5)
    assert len(calls.folder_syncs) == 2, "the five who waited did not share one folder fsync"
    for path in [leader, *followers]:
        calls.check_covered(path, results[path])


def test_a_failed_folder_fsync_fails_every_write_it_was_to_cover(
    tmp_path: Path, calls: Calls, condition: CountingCondition
) -> None:
    release = threading.Event()

    def on_folder_sync(ordinal: int) -> None:
        if ordinal == 1:
            release.wait(TIMEOUT)
        elif ordinal == 2:
            raise OSError(errno.EIO, "Input/output error")

    calls.on_folder_sync = on_folder_sync
    leader, followers, results = leader_and_followers(tmp_path, calls, condition, release, 3)
    assert isinstance(results[leader], int), f"the leader's fsync succeeded, yet: {results[leader]!r}"
    for path in followers:
        assert isinstance(results[path], OSError) and results[path].errno == errno.EIO, (path, results[path])
    # Whoever comes next is not told of an old failure: its own fsync decides.
    late = tmp_path / "late.json"
    fsio.write_bytes_atomic(late, b"z")
    calls.check_covered(late, calls.now())


def test_held_back_progress_of_many_sidecars_needs_no_thread_of_its_own(tmp_path: Path) -> None:
    sidecars = []
    for n in range(40):
        sidecar = Sidecar.new(tmp_path / f"i{n}.json", queue="q", item=f"i{n}", original_name=f"i{n}", kind="file",
                              fields={}, step_names=["ship"], host="test", payload=[f"i{n}"])  # fmt: skip
        sidecar.write()
        sidecars.append(sidecar)
    before = threading.active_count()
    for n, sidecar in enumerate(sidecars):
        sidecar.set_progress(0, {"bytes_done": n + 1, "bytes_total": 100})
        assert threading.active_count() <= before + 1, "a thread per held-back progress write"

    def all_written() -> bool:
        return all(json.loads(s.path.read_text())["steps"][0].get("progress", {}).get("bytes_done") == n + 1
                   for n, s in enumerate(sidecars))  # fmt: skip

    wait_for(all_written, 10, "every held-back progress to be written")


# Loaded by the daemon's interpreter (sitecustomize): notes each sidecar write (what it says) and whether
# its file and folder fsyncs were done before the write returned.
PATCH = """\
import json, os
from spoold import fsio

REPORT = os.environ["SPOOLD_TEST_REPORT"]
real_write = fsio.write_bytes_atomic

def write_bytes_atomic(path, data, *args, **kwargs):
    real_write(path, data, *args, **kwargs)
    if str(path).endswith(".json") and os.path.basename(os.path.dirname(path)) == "status":
        doc = json.loads(data)
        with open(REPORT, "a") as report:
            report.write(json.dumps([doc["state"], [s["state"] for s in doc["steps"]],
                                     sorted((doc["steps"][-1].get("checkpoint") or {}))]) + "\\n")

fsio.write_bytes_atomic = write_bytes_atomic
"""


@pytest.fixture
def writes_reported(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PATCH)
    report = tmp_path / "report.jsonl"
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    yield {"PYTHONPATH": python_path, "SPOOLD_TEST_REPORT": str(report)}, report


Daemon = Callable[..., DaemonProcess]


def sidecar_writes_of_one_item(out: Path, ship_options: str, write_config: Callable[[str], Path], spool: Path,
                               daemon: Daemon, writes_reported: tuple[dict[str, str], Path]) -> list[Any]:  # fmt: skip
    """Run one small item through `checksum -> ship` to `out`; the sidecar writes it cost, as reported."""
    env, report = writes_reported
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            chain:
              - checksum: {{}}
              - ship: {{to: 'file://{out}/'{ship_options}}}
        """)
    process = daemon(config, env=env)
    (spool / "q" / "inbox" / "x.bin").write_bytes(b"payload" * 100)
    wait_for(sidecar_state(spool, "q", "x.bin", "done"), 20, "x.bin done")
    process.stop()
    writes = [json.loads(line) for line in report.read_text().splitlines()]
    # A progress write (a step that took over a second on a loaded machine) repeats the write before it.
    return [w for n, w in enumerate(writes) if not n or w != writes[n - 1]]


def test_a_small_item_through_checksum_and_ship_costs_five_sidecar_writes(
    tmp_path: Path, write_config: Callable[[str], Path], spool: Path, daemon: Daemon,
    writes_reported: tuple[dict[str, str], Path],
) -> None:  # fmt: skip
    """Every state change is written (durably) when it happens. A step's end rides on the next step's start,
    which follows it with nothing done between; ship keeps no summary of its own when the source stays."""
    out = tmp_path / "out"
    writes = sidecar_writes_of_one_item(out, "", write_config, spool, daemon, writes_reported)
    assert (out / "x.bin").read_bytes() == b"payload" * 100
    assert writes == [
        ["queued", ["pending", "pending"], []],  # claimed
        ["running", ["running", "pending"], []],  # checksum started
        ["running", ["done", "running"], []],  # checksum done, ship started
        ["running", ["done", "done"], []],  # ship done, before the item moves to done/
        ["done", ["done", "done"], []],
    ]


def test_ship_that_deletes_its_source_records_the_delivery_before_the_source_goes(
    tmp_path: Path, write_config: Callable[[str], Path], spool: Path, daemon: Daemon,
    writes_reported: tuple[dict[str, str], Path],
) -> None:  # fmt: skip
    writes = sidecar_writes_of_one_item(tmp_path / "out", ", delete_source: true", write_config, spool, daemon,
                                        writes_reported)  # fmt: skip
    assert ["running", ["done", "running"], ["finished", "summary", "transfer"]] in writes
    assert writes[-2:] == [["running", ["done", "done"], []], ["done", ["done", "done"], []]]
