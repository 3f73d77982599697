"""Finished items are counted, not read at every start (daemon/tally.py), and `spoold status` on a huge queue
reads only what it shows. Each case runs the real daemon; the counts are what health.json says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spoold.statusview import FULL_READ_LIMIT
from tests.conftest import DaemonProcess, sidecar_state, wait_for

CONFIG = """\
    spool: {spool}
    rescan: 1s
    queues:
      q:
        settle: 0s
        retry: {attempts: 1}
        chain:
          - exec: {argv: ['sh', '-c', 'case "$SPOOLD_ITEM" in bad*) exit 3;; esac']}
    """


def health(spool: Path) -> dict[str, Any]:
    return json.loads((spool / "health.json").read_text())


def counts(spool: Path) -> dict[str, int]:
    queues: dict[str, dict[str, int]] = health(spool)["queues"]
    return queues.get("q", {})


def counts_become(spool: Path, expected: dict[str, int]) -> Callable[[], bool]:
    return lambda: counts(spool) == expected


def run_items(spool: Path, names: list[str]) -> None:
    for name in names:
        (spool / "q" / "inbox" / name).write_bytes(b"x")
    for name in names:
        wait_for(sidecar_state(spool, "q", name, "failed" if name.startswith("bad") else "done"), 20, name)


def spoold(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip


def test_a_clean_stop_leaves_counts_the_next_start_takes_without_reading_sidecars(
    write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    config = write_config(CONFIG)
    process = daemon(config)
    run_items(spool, ["a", "b", "bad1"])
    wait_for(counts_become(spool, {"done": 2, "failed": 1}), 15, "counts")
    assert process.stop() == 0
    stopped = health(spool)["stopped"]
    assert stopped["status_mtime_ns"]["q"] == os.stat(spool / "q" / "status").st_mtime_ns
    # Overwritten in place, the folder's mtime stays: a start that read every sidecar would drop this one.
    with open(spool / "q" / "status" / "a.json", "r+b") as stream:
        stream.write(b"not json at all")
    process = daemon(config)
    wait_for(lambda: health(spool).get("pid") == process.process.pid, 10, "new health")  # type: ignore[union-attr]
    assert counts(spool) == {"done": 2, "failed": 1}
    assert "stopped" not in health(spool), "a running daemon's health has no stop record"


def test_after_a_kill_the_counts_are_rebuilt_from_every_sidecar(
    write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    config = write_config(CONFIG)
    process = daemon(config)
    run_items(spool, ["a", "b", "bad1"])
    process.kill()
    # The end of an item cut short: its steps done and its folder moved to done/, the sidecar still running.
    status = spool / "q" / "status"
    document = json.loads((status / "b.json").read_text())
    document.update(state="running", step="exec")
    (status / "cut.json").write_text(json.dumps(dict(document, item="cut", original_name="cut", payload=["cut"])))
    os.rename(spool / "q" / "done" / "b", spool / "q" / "done" / "cut")
    (spool / "q" / "done" / "b").mkdir()
    (status / ".leftover-1.tmp").write_bytes(b"half a sidecar")
    os.utime(status / ".leftover-1.tmp", (1, 1))
    daemon(config)
    wait_for(counts_become(spool, {"done": 3, "failed": 1}), 15, "every sidecar counted")
    wait_for(sidecar_state(spool, "q", "cut", "done"), 10, "the cut item recorded done")
    assert not (status / ".leftover-1.tmp").exists()


def test_retry_while_stopped_or_running_moves_the_item_out_of_failed(
    write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    config = write_config(CONFIG.replace("bad*) exit 3", "bad*) test -e {tmp}/fixed || exit 3"))
    process = daemon(config)
    run_items(spool, ["a", "bad1", "bad2"])
    assert process.stop() == 0
    (config.parent / "fixed").touch()
    assert spoold("retry", "-c", str(config), "q", "bad1").returncode == 0
    process = daemon(config)
    wait_for(sidecar_state(spool, "q", "bad1", "done"), 20, "bad1 retried")
    wait_for(counts_become(spool, {"done": 2, "failed": 1}), 15, "counts after a retry while stopped")
    assert spoold("retry", "-c", str(config), "q", "bad2").returncode == 0
    wait_for(sidecar_state(spool, "q", "bad2", "done"), 20, "bad2 retried")
    wait_for(counts_become(spool, {"done": 3}), 15, "counts after a retry while running")
    process.signal(signal.SIGTERM)
    assert process.stop() == 0
    daemon(config)
    wait_for(counts_become(spool, {"done": 3}), 15, "the same counts after a clean restart")


def test_status_of_a_huge_queue_reads_only_what_it_shows(
    write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    config = write_config(CONFIG)
    process = daemon(config)
    run_items(spool, ["a", "bad1"])
    assert process.stop() == 0
    status = spool / "q" / "status"
    template = json.loads((status / "a.json").read_text())
    extra = FULL_READ_LIMIT + 50
    for n in range(extra):
        name = f"old-{n:05d}"
        (status / f"{name}.json").write_text(json.dumps(dict(template, item=name, original_name=name)))
    (spool / "q" / "work" / "waiting").mkdir()
    (status / "waiting.json").write_text(json.dumps(dict(template, item="waiting", original_name="waiting",
                                                         state="queued")))  # fmt: skip
    recorded = health(spool)
    recorded["queues"]["q"] = {"done": extra + 1, "failed": 1, "queued": 1}
    (spool / "health.json").write_text(json.dumps(recorded))
    result = spoold("status", "-c", str(config), "q", "--json")
    assert result.returncode == 0, result.stderr
    queue = json.loads(result.stdout)["queues"]["q"]
    assert queue["partial"] is True and queue["sidecars"] == extra + 3
    assert queue["counts"] == {"done": extra + 1, "failed": 1, "queued": 1}, "the daemon's counts"
    assert sorted(item["item"] for item in queue["items"]) == ["bad1", "waiting"], "unfinished and failed only"
    table = spoold("status", "-c", str(config))
    assert table.returncode == 0 and f"{extra + 3:,} items" in table.stdout
    assert "waiting" in table.stdout and "bad1" in table.stdout


def test_a_burst_is_claimed_a_slice_per_tick_so_the_loop_keeps_answering(
    write_config: Callable[[str], Path], spool: Path
) -> None:
    from spoold.daemon.config import load_config
    from spoold.daemon.intake import CLAIMS_PER_TICK, Intake

    config = load_config(write_config(CONFIG))
    inbox = spool / "q" / "inbox"
    inbox.mkdir(parents=True)
    total = CLAIMS_PER_TICK * 2 + 10
    for n in range(total):
        (inbox / f"f{n:04d}").write_bytes(b"x")
    intake = Intake(config.queues["q"], inbox)
    intake.scan(0.0)
    sizes = [len(intake.due(1e9)) for _ in range(4)]
    assert sizes == [CLAIMS_PER_TICK, CLAIMS_PER_TICK, 10, 0]


def test_a_burst_beyond_what_intake_tracks_waits_in_the_inbox_and_is_all_claimed(
    write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    from spoold.daemon.intake import MAX_CANDIDATES

    config = write_config(CONFIG)
    daemon(config)
    staging = spool / "staging"
    staging.mkdir()
    total = MAX_CANDIDATES + 600
    for n in range(total):
        (staging / f"f{n:05d}").write_bytes(b"x")
    for n in range(total):
        os.rename(staging / f"f{n:05d}", spool / "q" / "inbox" / f"f{n:05d}")
    wait_for(counts_become(spool, {"done": total}), 240, "every file of the burst done")
    assert not os.listdir(spool / "q" / "inbox")
