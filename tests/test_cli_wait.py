"""`spoold drop QUEUE PATH... --wait [--timeout]` against the real daemon: done -> 0, failed -> 1, timeout -> 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, sidecar_state, wait_for

WriteConfig = Callable[..., Path]
Start = Callable[..., DaemonProcess]
EX_USAGE, EX_TEMPFAIL = 64, 75


def spoold(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100"}, timeout=timeout)  # fmt: skip


def exec_config(write_config: WriteConfig, script: str, *, items: str = "files") -> Path:
    return write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            items: {items}
            settle: 0s
            retry: {{attempts: 1, delays: [0s]}}
            keep: {{done: 1d}}
            chain:
              - checksum: {{}}
              - exec: {{argv: [sh, -c, {json.dumps(script)}], timeout: 60s}}
        """)


def source(tmp_path: Path, name: str, data: bytes = b"hello\n") -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_wait_for_a_done_item_exits_0_with_its_duration(tmp_path: Path, write_config: WriteConfig,
                                                         daemon: Start) -> None:  # fmt: skip
    config = exec_config(write_config, "exit 0")
    daemon(config)
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "a.txt")), "--wait", "--timeout", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dropped ") and lines[-1].startswith("q/a.txt: done in "), lines
    assert lines[-1].endswith(" s") and "Traceback" not in result.stderr


def test_wait_finds_the_item_under_the_name_the_daemon_gave_it(tmp_path: Path, write_config: WriteConfig,
                                                               spool: Path, daemon: Start) -> None:  # fmt: skip
    config = exec_config(write_config, "exit 0")
    daemon(config)
    first = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "a.txt", b"one")), "--wait")
    assert first.returncode == 0 and "q/a.txt: done" in first.stdout, first.stdout + first.stderr
    # The name is taken (a.txt is kept in done/): this drop becomes a.1.txt, and --wait follows that one,
    # not the finished a.txt that has the same original name.
    second = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "a.txt", b"two")), "--wait")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "q/a.1.txt (dropped as a.txt): done in " in second.stdout, second.stdout
    assert (spool / "q" / "done" / "a.1.txt" / "a.1.txt").read_bytes() == b"two"


def test_wait_for_a_request_follows_the_item_without_its_json_suffix(tmp_path: Path, write_config: WriteConfig,
                                                                     daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          requests:
            items: requests
            settle: 0s
            chain:
              - exec: {argv: [sh, -c, 'exit 0']}
        """)
    daemon(config)
    request = source(tmp_path, "session1.json", b'{"session": "s1"}')
    result = spoold("drop", "-c", str(config), "requests", str(request), "--wait", "--timeout", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requests/session1 (dropped as session1.json): done in " in result.stdout, result.stdout


def test_wait_for_a_failed_item_exits_1_naming_the_step_and_error(tmp_path: Path, write_config: WriteConfig,
                                                                  daemon: Start) -> None:  # fmt: skip
    config = exec_config(write_config, "echo 'disk says no' >&2; exit 3")
    daemon(config)
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "bad.txt")), "--wait", "--timeout", "30s")
    assert result.returncode == 1, result.stdout + result.stderr
    line = result.stdout.splitlines()[-1]
    assert line.startswith("q/bad.txt: failed at exec: ") and "disk says no" in line, line
    assert "Traceback" not in result.stderr


def test_wait_reports_every_item_and_fails_when_any_failed(tmp_path: Path, write_config: WriteConfig,
                                                           daemon: Start) -> None:  # fmt: skip
    config = exec_config(write_config, 'case "$SPOOLD_ITEM" in bad*) echo nope >&2; exit 3;; esac')
    daemon(config)
    paths = [str(source(tmp_path, n)) for n in ("one.txt", "bad.txt", "two.txt")]
    result = spoold("drop", "-c", str(config), "q", *paths, "--wait", "--timeout", "30s")
    assert result.returncode == 1, result.stdout + result.stderr
    outcomes = sorted(line for line in result.stdout.splitlines() if not line.startswith("dropped "))
    assert len(outcomes) == 3, outcomes
    assert outcomes[0].startswith("q/bad.txt: failed at exec: ") and "nope" in outcomes[0], outcomes
    assert outcomes[1].startswith("q/one.txt: done in ") and outcomes[2].startswith("q/two.txt: done in "), outcomes


def test_wait_for_a_rejected_item_says_why(tmp_path: Path, write_config: WriteConfig, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            items: files
            settle: 0s
            ready: marker
            chain:
              - checksum: {}
        """)
    daemon(config)
    folder = tmp_path / "src" / "episode"
    folder.mkdir(parents=True)
    (folder / "frame.png").write_bytes(b"x")
    result = spoold("drop", "-c", str(config), "q", str(folder), "--wait", "--timeout", "30s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "q/episode: rejected: a folder was dropped into a queue of files" in result.stdout, result.stdout


def test_timeout_exits_75_and_names_what_is_still_running(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                          daemon: Start) -> None:  # fmt: skip
    config = exec_config(write_config, "sleep 30")
    daemon(config)
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "slow.txt")), "--wait", "--timeout", "2s")
    assert result.returncode == EX_TEMPFAIL, result.stdout + result.stderr
    assert "timed out after 2s" in result.stderr and "q/slow.txt (running at exec)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    wait_for(sidecar_state(spool, "q", "slow.txt", "running"), 10, "the item still runs: a timeout only stops waiting")


def test_timeout_without_a_daemon_warns_and_says_nothing_was_claimed(tmp_path: Path, write_config: WriteConfig,
                                                                      spool: Path) -> None:  # fmt: skip
    config = exec_config(write_config, "exit 0")
    (spool / "q" / "inbox").mkdir(parents=True)
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "a.txt")), "--wait", "--timeout", "300ms")
    assert result.returncode == EX_TEMPFAIL, result.stdout + result.stderr
    assert "no daemon is running" in result.stderr and "q/a.txt (not found in status/ yet)" in result.stderr
    assert (spool / "q" / "inbox" / "a.txt").exists(), "the drop itself stands"


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "10m"], "--timeout goes with --wait"),
    (["--wait", "--timeout", "soon"], "--timeout: expected a duration"),
    (["--wait", "--timeout=-5s"], "--timeout: expected a duration"),
])  # fmt: skip
def test_bad_wait_options_are_usage_errors(tmp_path: Path, write_config: WriteConfig, spool: Path, args: list[str],
                                           message: str) -> None:  # fmt: skip
    config = exec_config(write_config, "exit 0")
    (spool / "q" / "inbox").mkdir(parents=True)
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "a.txt")), *args)
    assert result.returncode == EX_USAGE, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (spool / "q" / "inbox" / "a.txt").exists(), "nothing is dropped when the options are wrong"


def test_two_paths_with_one_name_are_refused_before_anything_is_dropped(tmp_path: Path, write_config: WriteConfig,
                                                                         spool: Path) -> None:  # fmt: skip
    config = exec_config(write_config, "exit 0")
    (spool / "q" / "inbox").mkdir(parents=True)
    one, two = tmp_path / "x" / "a.txt", tmp_path / "y" / "a.txt"
    for path in (one, two):
        path.parent.mkdir()
        path.write_text(str(path))
    result = spoold("drop", "-c", str(config), "q", str(one), str(two))
    assert result.returncode == EX_USAGE and "same name" in result.stderr, result.stderr
    assert os.listdir(spool / "q" / "inbox") == []


def test_wait_for_a_bundle_with_its_marker(tmp_path: Path, write_config: WriteConfig, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          episodes:
            items: bundles
            chain:
              - checksum: {}
        """)
    daemon(config)
    folder = tmp_path / "src" / "ep_5"
    (folder / "cam").mkdir(parents=True)
    (folder / "cam" / "f1.png").write_bytes(b"png")
    result = spoold("drop", "-c", str(config), "episodes", str(folder), "--wait", "--timeout", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("episodes/ep_5: done in "), result.stdout


def test_wait_when_the_queue_keeps_no_done_data(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            keep: {done: delete}
            chain:
              - checksum: {}
        """)
    daemon(config)
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, "gone.txt")), "--wait", "--timeout", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "q/gone.txt: done in " in result.stdout
    assert not (spool / "q" / "done" / "gone.txt").exists(), "found by its sidecar though its data is gone"


def test_wait_for_a_name_too_long_to_keep(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                          daemon: Start) -> None:  # fmt: skip
    config = exec_config(write_config, "exit 0")
    daemon(config)
    name = "n" * 250 + ".txt"
    result = spoold("drop", "-c", str(config), "q", str(source(tmp_path, name)), "--wait", "--timeout", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    (item,) = [p.name for p in (spool / "q" / "done").iterdir()]
    assert item != name and "(dropped as nnn" in result.stdout and ": done in " in result.stdout, result.stdout


def test_ctrl_c_stops_waiting_without_a_traceback(tmp_path: Path, write_config: WriteConfig, spool: Path) -> None:
    config = exec_config(write_config, "exit 0")
    (spool / "q" / "inbox").mkdir(parents=True)
    waiter = subprocess.Popen([sys.executable, "-m", "spoold", "drop", "-c", str(config), "q",
                               str(source(tmp_path, "a.txt")), "--wait"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert waiter.stdout is not None and waiter.stdout.readline().startswith("dropped ")
        waiter.send_signal(signal.SIGINT)
        out, err = waiter.communicate(timeout=10)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 130, out + err
    assert "stopped waiting; the daemon goes on with: q/a.txt" in err and "Traceback" not in err, err
