"""The command line as a new user meets it: --help, the embedded default, status, init, drop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

DATA = Path(__file__).resolve().parent / "data"


def spoold(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)  # fmt: skip


def test_help_matches_checked_in_copy() -> None:
    result = spoold("--help")
    assert result.returncode == 0
    assert result.stdout == (DATA / "help.txt").read_text(), "regenerate with: COLUMNS=80 spoold --help"


def test_version() -> None:
    result = spoold("--version")
    assert result.returncode == 0 and result.stdout.startswith("spoold ")


def test_unknown_command_is_usage_error() -> None:
    result = spoold("frobnicate")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_embedded_default_run_ships_a_dropped_file(tmp_path: Path) -> None:
    if Path("/etc/spoold/spoold.yaml").exists():
        pytest.skip("/etc/spoold/spoold.yaml exists, so the embedded default is not used")
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "spoold", "run"], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    spool = tmp_path / "spool"
    try:
        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "daemon.log").read_text()
            health = json.loads((spool / "health.json").read_text()) if (spool / "health.json").exists() else {}
            return bool(health.get("ready"))

        wait_for(ready, 15, "embedded default ready")
        for queue in ("incoming", "outgoing"):
            for sub in ("inbox", "work", "done", "failed", "status"):
                assert (spool / queue / sub).is_dir()
        (spool / "incoming" / "inbox" / "hello.txt").write_text("hello, spool\n")
        wait_for(lambda: (spool / "shipped" / "hello.txt").exists(), 15, "shipped file")
        wait_for(sidecar_state(spool, "outgoing", "hello.txt", "done"), 10, "outgoing done")
        assert (spool / "shipped" / "hello.txt").read_text() == "hello, spool\n"
        manifest = json.loads((spool / "shipped" / "hello.txt.manifest.json").read_text())
        assert manifest["files"][0]["size_bytes"] == len("hello, spool\n")
        assert len(manifest["files"][0]["sha256"]) == 64
        assert read_sidecar(spool, "incoming", "hello.txt")["state"] == "done"  # type: ignore[index]
        assert not [p for p in (spool / "shipped").iterdir() if p.name.startswith(".")]

        status = spoold("status", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "done" in status.stdout
        as_json = json.loads(spoold("status", "--json", cwd=tmp_path).stdout)
        assert as_json["queues"]["outgoing"]["counts"] == {"done": 1}
        assert as_json["daemon"]["running"] is True
        item = json.loads(spoold("status", "outgoing", "hello.txt", "--json", cwd=tmp_path).stdout)
        assert item["state"] == "done" and item["schema"] == "spoold.status/1"
        missing = spoold("status", "outgoing", "nope.txt", cwd=tmp_path)
        assert missing.returncode != 0 and "Traceback" not in missing.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
        log.close()
    assert code == 0, (tmp_path / "daemon.log").read_text()


def test_init_creates_layout_and_a_config_that_checks(tmp_path: Path) -> None:
    result = spoold("init", str(tmp_path / "sp"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = tmp_path / "sp" / "spoold.yaml"
    assert config.exists()
    assert (tmp_path / "sp" / "incoming" / "inbox").is_dir()
    assert oct((tmp_path / "sp" / "incoming" / "inbox").stat().st_mode & 0o7777) == oct(0o2770)
    assert spoold("check", "-c", str(config)).returncode == 0


def test_drop_then_run(tmp_path: Path, write_config: Callable[[str], Path], spool: Path,
                       daemon: Callable[..., DaemonProcess]) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            chain: [checksum]
          b:
            items: bundles
            chain: [checksum]
        """)
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 1000)
    folder = tmp_path / "ep1"
    (folder / "cam").mkdir(parents=True)
    (folder / "cam" / "f1.png").write_bytes(b"png")
    missing = spoold("drop", "-c", str(config), "q", str(source))
    assert missing.returncode != 0 and "spoold init" in missing.stderr  # no inbox yet
    daemon(config)
    assert spoold("drop", "-c", str(config), "q", str(source)).returncode == 0
    assert spoold("drop", "-c", str(config), "b", str(folder)).returncode == 0
    done = wait_for(sidecar_state(spool, "q", "data.bin", "done"), 10, "dropped file done")
    assert done["steps"][0]["result"]["bytes"] == 1000
    bundle = wait_for(sidecar_state(spool, "b", "ep1", "done"), 10, "dropped bundle done")
    assert bundle["kind"] == "bundle"
    assert source.exists(), "drop copies, it does not move"
    bad = spoold("drop", "-c", str(config), "nosuchqueue", str(source))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_retry_needs_an_item_or_all(write_config: Callable[[str], Path], spool: Path) -> None:
    config = write_config("spool: {spool}\nqueues:\n  q: {chain: [checksum]}\n")
    result = spoold("retry", "-c", str(config), "q")
    assert result.returncode == 64 and "--all" in result.stderr


def test_status_watch_json_streams_one_document_per_refresh_and_ctrl_c_exits_0(
    tmp_path: Path, write_config: Callable[[str], Path], spool: Path
) -> None:
    config = write_config("spool: {spool}\nqueues:\n  q: {chain: [checksum]}\n")
    out = tmp_path / "watch.out"
    with open(out, "wb") as stream:
        watcher = subprocess.Popen([sys.executable, "-m", "spoold", "status", "-c", str(config), "--watch", "--json"],
                                   stdout=stream, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for(lambda: out.read_bytes().count(b"\n") >= 2, 15, "two refreshes")
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0 and b"Traceback" not in err, err
    documents = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert len(documents) >= 2 and all(d["queues"]["q"]["counts"] == {} for d in documents)
    assert b"\x1b[" not in out.read_bytes(), "a stream of JSON is never cleared like a screen"
    assert json.loads(spoold("status", "-c", str(config), "--json").stdout)["queues"]["q"]["items"] == []
