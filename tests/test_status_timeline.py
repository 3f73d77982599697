"""`spoold status QUEUE ITEM`: each step, each attempt, its duration, bytes, rate and error; progress lines;
`--watch` for one item, `--watch --json` as JSON Lines, Ctrl-C leaves cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from spoold.daemon.attempts import HISTORY_ENTRIES
from spoold.daemon.sidecar import Sidecar, error_record
from spoold.statusfmt import progress_text
from spoold.statusview import render_item, render_table
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

WriteConfig = Callable[..., Path]
Start = Callable[..., DaemonProcess]


def spoold(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"}, timeout=timeout)  # fmt: skip


# ---- through the real daemon ---------------------------------------------------------------------------------


def test_an_item_retried_once_then_done_shows_both_attempts(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                            daemon: Start) -> None:  # fmt: skip
    flag = tmp_path / "tried-once"
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            retry: {{attempts: 3, delays: [0s, 100ms]}}
            chain:
              - checksum: {{}}
              - exec:
                  argv: [sh, -c, 'if [ -e {flag} ]; then exit 0; fi; touch {flag}; echo "link down" >&2; exit 75']
        """)
    daemon(config)
    data = b"x" * 3_000_000
    (spool / "q" / "inbox" / ".a.bin.tmp").write_bytes(data)
    os.rename(spool / "q" / "inbox" / ".a.bin.tmp", spool / "q" / "inbox" / "a.bin")
    doc = wait_for(sidecar_state(spool, "q", "a.bin", "done"), 20, "a.bin done")

    checksum, run = doc["steps"]
    assert checksum["bytes"] == len(data) and checksum["duration_s"] >= 0
    assert [h["state"] for h in checksum["history"]] == ["done"]
    first, second = run["history"]
    assert (first["attempt"], first["state"], second["attempt"], second["state"]) == (1, "retrying", 2, "done")
    assert first["error"]["type"] == "transient" and "link down" in first["error"]["message"]
    assert "error" not in second and first["finished"] <= second["started"]
    assert all(h["duration_s"] >= 0 for h in run["history"]) and run["duration_s"] == second["duration_s"]

    shown = spoold("status", "-c", str(config), "q", "a.bin")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "q/a.bin: done"
    checksum_line = next(line for line in lines if line.lstrip().startswith("- checksum"))
    assert "done in " in checksum_line and "2.9 MiB" in checksum_line, checksum_line
    exec_at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("- exec"))
    assert "done (attempt 2)" in lines[exec_at]
    assert lines[exec_at + 1].strip().startswith("attempt 1: started 20") and "failed after " in lines[exec_at + 1]
    assert "(retried): transient: " in lines[exec_at + 1] and "link down" in lines[exec_at + 1]
    assert lines[exec_at + 2].strip().startswith("attempt 2: started 20") and "done in " in lines[exec_at + 2]


class FlakyServer(ThreadingHTTPServer):
    """Serves one file: the first response stops part-way, the second is a 503, then ranges are served."""

    daemon_threads = True

    def __init__(self, data: bytes, cut: int) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.data, self.cut, self.count = data, cut, 0
        self.lock = threading.Lock()


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.count += 1
            count = self.server.count
        data = self.server.data
        if count == 2:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(data[start : self.server.cut] if count == 1 else data[start:])
        self.close_connection = True


def test_a_fetch_retried_after_a_503_shows_each_attempts_bytes(tmp_path: Path, write_config: WriteConfig,
                                                               spool: Path, daemon: Start) -> None:  # fmt: skip
    data = bytes(range(256)) * 4096  # 1 MiB
    server = FlakyServer(data, cut=300_000)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        config = write_config("""\
            spool: {spool}
            queues:
              requests:
                items: requests
                settle: 0s
                retry: {attempts: 3, delays: [0s, 100ms]}
                chain:
                  - fetch: {into: files, retries: 0, timeout: 5s}
              files:
                settle: 0s
                chain:
                  - checksum: {}
            """)
        daemon(config)
        request = {"files": [{"url": f"http://127.0.0.1:{server.server_address[1]}/big.bin", "size": len(data)}]}
        (spool / "requests" / "inbox" / ".r.tmp").write_text(json.dumps(request))
        os.rename(spool / "requests" / "inbox" / ".r.tmp", spool / "requests" / "inbox" / "r.json")
        doc = wait_for(sidecar_state(spool, "requests", "r", "done"), 30, "the request done")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    first, second = doc["steps"][0]["history"]
    assert (first["state"], first["bytes"], second["state"], second["bytes"]) == ("retrying", 300_000, "done",
                                                                                  len(data))  # fmt: skip
    assert "503" in first["error"]["message"] and first["error"]["type"] == "transient"
    lines = spoold("status", "-c", str(config), "requests", "r").stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  - fetch"))
    assert lines[at].split() == ["-", "fetch", "done", "(attempt", "2)"], lines
    assert "attempt 1: " in lines[at + 1] and "failed after " in lines[at + 1] and "293.0 KiB" in lines[at + 1]
    assert "HTTP 503" in lines[at + 1]
    assert "attempt 2: " in lines[at + 2] and "done in " in lines[at + 2] and "1.0 MiB" in lines[at + 2], lines


def test_watch_one_item_as_json_lines_and_leave_on_ctrl_c(tmp_path: Path, write_config: WriteConfig,
                                                          spool: Path) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            chain:
              - ship: {to: 'file://{tmp}/out/'}
        """)
    (spool / "q" / "status").mkdir(parents=True)
    sidecar = running_ship(spool / "q" / "status" / "big.iso")
    out = tmp_path / "watch.out"
    with open(out, "wb") as stream:
        watcher = subprocess.Popen([sys.executable, "-m", "spoold", "status", "-c", str(config), "q", "big.iso",
                                    "--watch", "--json"], stdout=stream, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for(lambda: out.read_bytes().count(b"\n") >= 1, 15, "a first document")
        sidecar.set_progress(0, {"bytes_done": 9 << 20})
        sidecar.write()
        wait_for(lambda: b'"bytes_done": 9437184' in out.read_bytes(), 15, "the refresh after the progress moved")
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0 and b"Traceback" not in err, err
    documents = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert len(documents) >= 2 and all(d["item"] == "big.iso" for d in documents), "one JSON document per line"


def test_watch_one_item_draws_the_progress_bar(tmp_path: Path, write_config: WriteConfig, spool: Path) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            chain:
              - ship: {to: 'file://{tmp}/out/'}
        """)
    (spool / "q" / "status").mkdir(parents=True)
    running_ship(spool / "q" / "status" / "big.iso")
    out = tmp_path / "watch.out"
    with open(out, "wb") as stream:
        watcher = subprocess.Popen([sys.executable, "-m", "spoold", "status", "-c", str(config), "q", "big.iso",
                                    "--watch"], stdout=stream, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for(lambda: out.read_bytes().count(b"(refreshing every") >= 2, 15, "two redraws")
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0 and b"Traceback" not in err, err
    screen = out.read_text()
    assert "  40.0% 2.0 MiB/s eta 3.0 s file 3/14 part-03.bin" in screen, screen
    assert "log (edge-01 job-7):" in screen and "step 12 of 40" in screen


def running_ship(path: Path) -> Sidecar:
    sidecar = Sidecar.new(path.with_suffix(path.suffix + ".json"), queue="q", item=path.name,
                          original_name=path.name, kind="file", fields={}, step_names=["ship"], host="edge-01",
                          payload=[path.name])  # fmt: skip
    sidecar.start_step(0)
    sidecar.set_progress(0, {"bytes_done": 4 << 20, "bytes_total": 10 << 20, "rate_bps": 2 << 20, "eta_s": 3.0,
                             "files_done": 2, "files_total": 14, "file": "part-03.bin",
                             "log_tail": ["step 11 of 40", "step 12 of 40"], "host": "edge-01", "job": "job-7"})
    sidecar.write()
    return sidecar


# ---- the sidecar's history --------------------------------------------------------------------------------------


def new_sidecar(tmp_path: Path, steps: list[str]) -> Sidecar:
    return Sidecar.new(tmp_path / "status" / "item.json", queue="q", item="item", original_name="item", kind="file",
                       fields={}, step_names=steps, host="test", payload=["item"])  # fmt: skip


def test_history_keeps_each_attempts_bytes_and_error(tmp_path: Path) -> None:
    (tmp_path / "status").mkdir()
    sidecar = new_sidecar(tmp_path, ["ship"])
    sidecar.start_step(0)
    sidecar.set_progress(0, {"bytes_done": 3 << 20, "bytes_total": 10 << 20})
    error = error_record("ship", "transient", "connection reset by peer", retryable=True)
    sidecar.retrying(0, error, 2, 0.0)
    step = sidecar.step_entry(0)
    assert step["state"] == "retrying" and step["attempt"] == 2
    sidecar.start_step(0)
    assert "progress" not in step, "a new attempt starts without the last one's progress"
    sidecar.set_progress(0, {"bytes_done": 10 << 20, "bytes_total": 10 << 20})
    sidecar.step_done(0, {}, payload=None, extras=[], fields={})
    first, second = step["history"]
    assert first["bytes"] == 3 << 20 and first["error"] == error and first["state"] == "retrying"
    assert second["bytes"] == 10 << 20 and "error" not in second and step["bytes"] == 10 << 20
    assert "progress" not in step and step["duration_s"] == second["duration_s"]

    lines = render_item(sidecar.doc).splitlines()
    assert lines[1].split()[:4] == ["-", "ship", "done", "(attempt"]
    assert "3.0 MiB" in lines[2] and "transient: connection reset by peer" in lines[2] and "attempt 1:" in lines[2]
    assert "10.0 MiB" in lines[3] and "attempt 2:" in lines[3]


def test_a_crash_mid_attempt_is_recorded_when_the_step_starts_again(tmp_path: Path) -> None:
    (tmp_path / "status").mkdir()
    sidecar = new_sidecar(tmp_path, ["ship"])
    sidecar.start_step(0)
    sidecar.set_progress(0, {"bytes_done": 5, "bytes_total": 10})
    sidecar.write()
    # kill -9: the next daemon loads what was written and starts the step again.
    again = Sidecar.load(sidecar.path)
    assert again is not None
    again.start_step(0)
    (lost,) = again.step_entry(0)["history"]
    assert lost["state"] == "interrupted" and "finished" not in lost and lost["bytes"] == 5
    assert "the daemon stopped without recording it" in render_item(again.doc)


def test_a_stop_mid_attempt_and_a_permanent_failure_are_recorded(tmp_path: Path) -> None:
    (tmp_path / "status").mkdir()
    sidecar = new_sidecar(tmp_path, ["fetch"])
    sidecar.start_step(0)
    sidecar.interrupted(0)
    sidecar.start_step(0)
    sidecar.failed(0, error_record("fetch", "permanent", "404 Not Found", retryable=False))
    history = sidecar.step_entry(0)["history"]
    assert [(h["attempt"], h["state"]) for h in history] == [(1, "interrupted"), (1, "failed")]
    assert history[1]["error"]["message"] == "404 Not Found"


def test_history_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "status").mkdir()
    sidecar = new_sidecar(tmp_path, ["ship"])
    for attempt in range(1, HISTORY_ENTRIES + 6):
        sidecar.start_step(0)
        sidecar.retrying(0, error_record("ship", "transient", f"try {attempt}", retryable=True), attempt + 1, 0.0)
    history = sidecar.step_entry(0)["history"]
    assert len(history) == HISTORY_ENTRIES and history[-1]["error"]["message"] == f"try {HISTORY_ENTRIES + 5}"
    assert history[0]["attempt"] == 6


def test_an_old_sidecar_without_history_still_shows(tmp_path: Path) -> None:
    document: dict[str, Any] = {"queue": "q", "item": "a", "original_name": "a", "state": "retrying", "steps": [
        {"name": "ship", "state": "retrying", "attempt": 2, "error": {"message": "timed out"}},
        {"name": "more", "state": "pending", "history": "not a list"}]}  # fmt: skip
    lines = render_item(document).splitlines()
    assert lines[1].split() == ["-", "ship", "retrying", "(attempt", "2):", "timed", "out"]
    assert lines[2].split() == ["-", "more", "pending"]


# ---- progress text ---------------------------------------------------------------------------------------------


def test_progress_with_an_unknown_total_shows_bytes_and_rate_only() -> None:
    text = progress_text({"bytes_done": 5 << 20, "bytes_total": None, "rate_bps": 1 << 20, "eta_s": None}, 80)
    assert text == "5.0 MiB 1.0 MiB/s"
    assert "%" not in text and "eta" not in text


def test_progress_of_several_files_names_the_current_one() -> None:
    progress = {"bytes_done": 1, "bytes_total": 4, "files_done": 1, "files_total": 14, "file": "b.mp4"}
    assert progress_text(progress, 80).endswith(" file 2/14 b.mp4")
    assert progress_text({**progress, "files_done": 14}, 80).endswith(" file 14/14 b.mp4"), "capped at the total"
    hostile = progress_text({**progress, "file": "\x1b]0;owned\x07.mp4"}, 80)
    assert "\x1b" not in hostile and "\\x1b]0;owned\\x07.mp4" in hostile
    assert progress_text({"files_done": 0, "files_total": 3, "bytes_done": 0, "bytes_total": None}, 80) == (
        "0 B file 1/3")


def test_progress_of_a_remote_job_shows_its_last_log_line() -> None:
    assert progress_text({"bytes_done": 0, "bytes_total": 0, "log_tail": ["a", "epoch 3\x1b[2J"]}, 80) == (
        "log: epoch 3\\x1b[2J")


def test_the_queue_listing_shows_progress_without_a_total() -> None:
    data = {"spool": "/s", "daemon": {"running": False}, "queues": {"q": {"counts": {"running": 1}, "items": [
        {"item": "req", "state": "running", "step": "fetch", "arriving": False, "gather": None,
         "progress": {"bytes_done": 2048, "bytes_total": None, "rate_bps": 1024, "files_done": 0,
                      "files_total": 2, "file": "one.bin"}}]}}}  # fmt: skip
    row = render_table(data, is_all=False, width=120).splitlines()[-1]
    assert row.split()[:3] == ["req", "running", "fetch"] and row.endswith("2.0 KiB 1.0 KiB/s file 1/2 one.bin")


def test_status_of_an_item_that_is_not_there_is_a_clear_error(write_config: WriteConfig, spool: Path) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            chain:
              - checksum: {}
        """)
    result = spoold("status", "-c", str(config), "q", "nope", "--watch")
    assert result.returncode == 66 and "no item 'nope' in queue 'q'" in result.stderr
    assert "Traceback" not in result.stderr
    assert read_sidecar(spool, "q", "nope") is None
