"""systemd integration over the real sd_notify protocol, and the units themselves."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, DaemonProcess, need_or_skip, sidecar_state, wait_for

CONFIG = """\
spool: {spool}
queues:
  incoming:
    settle: 0.1s
    chain:
      - checksum: {algorithms: [sha256]}
"""


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return self.messages
            self.messages.extend(data.decode().split("\n"))

    def wait_for(self, line: str, after: int = 0, timeout: float = 15.0) -> int:
        """Index of the first `line` received at or after index `after`."""

        def seen() -> int | None:
            messages = self.drain()
            for index in range(after, len(messages)):
                if messages[index] == line or messages[index].startswith(line):
                    return index + 1
            return None

        index: int = wait_for(seen, timeout, f"notify message {line!r}")
        return index - 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def notify_daemon(
    tmp_path: Path, write_config: Callable[[str], Path], listener: NotifyListener, spool: Path,
    daemon: Callable[..., DaemonProcess],
) -> Callable[..., DaemonProcess]:  # fmt: skip
    def start(config_text: str = CONFIG, **env: str) -> DaemonProcess:
        config = write_config(config_text)
        return daemon(config, env={"NOTIFY_SOCKET": str(listener.path), **env}, wait=False)

    return start


def test_ready_only_after_the_spool_exists_and_first_scan(
    notify_daemon: Callable[..., DaemonProcess], listener: NotifyListener, spool: Path
) -> None:
    (spool / "incoming" / "inbox").mkdir(parents=True)
    (spool / "incoming" / "inbox" / "early.bin").write_bytes(b"x" * 10)
    notify_daemon()
    listener.wait_for("READY=1")
    # The first scan ran before READY: the early file is already tracked, and it finishes.
    assert (spool / "incoming" / "status").is_dir()
    wait_for(sidecar_state(spool, "incoming", "early.bin", "done"), 10, "early file done")
    status = listener.wait_for("STATUS=")
    assert "running" in listener.messages[status] and "disk ok" in listener.messages[status]


def test_watchdog_pings_at_half_the_interval(notify_daemon: Callable[..., DaemonProcess],
                                             listener: NotifyListener) -> None:  # fmt: skip
    notify_daemon(WATCHDOG_USEC="400000")
    start = listener.wait_for("READY=1")
    first = listener.wait_for("WATCHDOG=1", start)
    t0 = time.monotonic()
    listener.wait_for("WATCHDOG=1", first + 1)
    listener.wait_for("WATCHDOG=1", listener.wait_for("WATCHDOG=1", first + 1) + 1)
    # Two more pings at 0.2 s each: well under the 0.4 s watchdog, and no busy loop of pings.
    assert time.monotonic() - t0 < 2.0
    assert listener.drain().count("WATCHDOG=1") < 30


def test_no_watchdog_pings_for_another_pid(notify_daemon: Callable[..., DaemonProcess],
                                           listener: NotifyListener) -> None:  # fmt: skip
    process = notify_daemon(WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    listener.wait_for("READY=1")
    process.signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1")
    assert process.process is not None
    process.process.wait(timeout=15)
    assert "WATCHDOG=1" not in listener.drain()


def test_reload_good_and_bad_config(
    notify_daemon: Callable[..., DaemonProcess], listener: NotifyListener, write_config: Callable[[str], Path],
    spool: Path,
) -> None:  # fmt: skip
    process = notify_daemon()
    ready = listener.wait_for("READY=1")
    write_config(CONFIG + "  second:\n    chain:\n      - checksum: {}\n")
    process.signal(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING=1", ready + 1)
    listener.wait_for("READY=1", reloading + 1)
    wait_for(lambda: (spool / "second" / "inbox").is_dir(), 10, "new queue created on reload")

    write_config("queues: {broken: {chain: [{nosuch: {}}]}}\n")
    process.signal(signal.SIGHUP)
    again = listener.wait_for("RELOADING=1", reloading + 1)
    listener.wait_for("READY=1", again + 1)
    wait_for(lambda: "reload failed" in process.log(), 10, "reload failure logged")
    assert "unknown handler 'nosuch'" in process.log()
    assert process.process is not None and process.process.poll() is None
    # The old config keeps working.
    (spool / "second" / "inbox" / "after.bin").write_bytes(b"data")
    wait_for(sidecar_state(spool, "second", "after.bin", "done"), 10, "item done after failed reload")


def test_sigterm_sends_stopping_and_exits_cleanly(notify_daemon: Callable[..., DaemonProcess],
                                                  listener: NotifyListener) -> None:  # fmt: skip
    process = notify_daemon()
    listener.wait_for("READY=1")
    process.signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1")
    assert process.process is not None
    assert process.process.wait(timeout=15) == 0


def test_graceful_stop_checkpoints_a_running_step_and_resumes(
    notify_daemon: Callable[..., DaemonProcess], listener: NotifyListener, spool: Path,
    daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:  # fmt: skip
    config = CONFIG.replace(
        "      - checksum: {algorithms: [sha256]}",
        # A step that runs long: SIGTERM must checkpoint it.
        "      - exec: {argv: [" + sys.executable + ", -c, 'import time; time.sleep(30)'], timeout: 60s}\n"  # slow step
        "      - checksum: {}",
    )
    process = notify_daemon(config)
    listener.wait_for("READY=1")
    (spool / "incoming" / "inbox" / "slow.bin").write_bytes(b"payload")
    wait_for(sidecar_state(spool, "incoming", "slow.bin", "running"), 10, "exec running")
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.process is not None
    assert process.process.wait(timeout=15) == 0
    assert time.monotonic() - started < 10, "a running step must stop promptly on SIGTERM"
    doc = wait_for(sidecar_state(spool, "incoming", "slow.bin", "queued"), 5, "sidecar back to queued")
    assert doc["steps"][0]["state"] == "interrupted"
    assert (spool / "incoming" / "work" / "slow.bin" / "slow.bin").exists()


def test_second_sigterm_stops_at_once(notify_daemon: Callable[..., DaemonProcess], listener: NotifyListener,
                                      spool: Path) -> None:  # fmt: skip
    config = CONFIG.replace(
        "      - checksum: {algorithms: [sha256]}",
        # A step that ignores the stop flag for a while (a long sleep in a child that traps TERM).
        "      - exec: {argv: [" + sys.executable + ", -c, "
        "'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)']}",  # a stuck step
    )
    process = notify_daemon(config)
    listener.wait_for("READY=1")
    (spool / "incoming" / "inbox" / "stuck.bin").write_bytes(b"payload")
    wait_for(sidecar_state(spool, "incoming", "stuck.bin", "running"), 10, "exec running")
    process.signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1")
    process.signal(signal.SIGTERM)
    assert process.process is not None
    assert process.process.wait(timeout=10) != 0


def test_bad_config_exits_78(tmp_path: Path, write_config: Callable[[str], Path]) -> None:
    config = write_config("queues:\n  q:\n    chain: [{checksum: {algos: [sha256]}}]\n")
    result = subprocess.run([sys.executable, "-m", "spoold", "run", "-c", str(config)], capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 78
    assert "queues.q.chain[0].checksum.algos" in result.stderr and "Traceback" not in result.stderr


def test_journal_prefix_on_stderr_when_the_journal_socket_is_gone(
    write_config: Callable[[str], Path], daemon: Callable[..., DaemonProcess], spool: Path, tmp_path: Path
) -> None:
    # stderr is the journal stream (JOURNAL_STREAM names it), but journald's socket cannot be written:
    # every record still reaches stderr, with the priority prefix journald reads from a stream.
    log = tmp_path / "daemon0.log"
    log.touch()
    st = log.stat()
    process = daemon(write_config(CONFIG), env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                                                "SPOOLD_JOURNAL_SOCKET": str(tmp_path / "no-journal.sock")})
    (spool / "incoming" / "inbox" / "j.bin").write_bytes(b"x")
    wait_for(sidecar_state(spool, "incoming", "j.bin", "done"), 10, "done")
    wait_for(lambda: "j.bin: done" in process.log(), 5, "log line")
    lines = [line for line in process.log().splitlines() if line]
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>", "<2>") for line in lines), lines[:5]
    assert not any(line[3:7].isdigit() for line in lines), "no timestamps of our own under journald"


def test_no_journal_format_when_journal_stream_names_another_file(
    write_config: Callable[[str], Path], daemon: Callable[..., DaemonProcess], spool: Path
) -> None:
    # systemd passes JOURNAL_STREAM on to children whose stderr went elsewhere: then it is not the journal.
    process = daemon(write_config(CONFIG), env={"JOURNAL_STREAM": "8:1234"})
    (spool / "incoming" / "inbox" / "j.bin").write_bytes(b"x")
    wait_for(lambda: "j.bin: done" in process.log(), 10, "log line")
    assert not any(line.startswith("<") for line in process.log().splitlines()), process.log()


def test_status_says_running_while_a_long_step_runs(
    notify_daemon: Callable[..., DaemonProcess], listener: NotifyListener, spool: Path, tmp_path: Path
) -> None:
    # The step blocks on a FIFO until the test opens it for writing: nothing here depends on timing.
    release = tmp_path / "release.fifo"
    os.mkfifo(release)
    config = CONFIG.replace(
        "      - checksum: {algorithms: [sha256]}",
        "      - exec: {argv: [" + sys.executable + ", -c, 'import sys; open(sys.argv[1]).read()', " + str(release)
        + "]}",
    )
    notify_daemon(config)
    ready = listener.wait_for("READY=1")
    (spool / "incoming" / "inbox" / "long.bin").write_bytes(b"payload")
    wait_for(sidecar_state(spool, "incoming", "long.bin", "running"), 10, "exec running")
    listener.wait_for("STATUS=1 running, 0 queued, 0 failed, disk ok", ready)
    during = [m for m in listener.drain()[ready:] if m.startswith("STATUS=")]
    writer = wait_for(lambda: _open_writer(release), 10, "the step reading its FIFO")
    os.write(writer, b"go")
    os.close(writer)
    wait_for(sidecar_state(spool, "incoming", "long.bin", "done"), 10, "item done")
    listener.wait_for("STATUS=0 running, 0 queued, 0 failed, disk ok", ready + len(during))
    # From its claim to its end the item was never reported queued: it was dispatched in the same tick.
    assert during[-1] == "STATUS=1 running, 0 queued, 0 failed, disk ok", during
    assert "STATUS=0 running, 1 queued, 0 failed, disk ok" not in listener.drain()[ready:], listener.messages


def _open_writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody reads it yet
        return None


# ---- the unit files -----------------------------------------------------------------------------------------


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        need_or_skip("systemd-analyze is not installed")
    return str(tool)


def _units_with_real_binary(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's spoold, as an installer would set it."""
    spoold = shutil.which("spoold") or str(Path(sys.executable).with_name("spoold"))
    units = []
    for name in ("spoold.service", "spoold@.service"):
        text = (REPO / "systemd" / name).read_text().replace("/usr/local/bin/spoold", spoold)
        target = tmp_path / (name if "@" not in name else "spoold@edge.service")
        target.write_text(text)
        units.append(target)
    return units


def test_units_verify_cleanly(tmp_path: Path) -> None:
    tool = _analyze()
    for unit in _units_with_real_binary(tmp_path):
        result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        output = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if unit.name in line)
        assert output == "", output


@pytest.mark.parametrize("unit", ["spoold.service", "spoold@.service"])
def test_units_security_exposure_at_most_2(unit: str) -> None:
    tool = _analyze()
    result = subprocess.run([tool, "security", "--offline=yes", str(REPO / "systemd" / unit)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    summary = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert summary, result.stdout + result.stderr
    score = float(summary[0].split(":")[1].split()[0])
    assert score <= 2.0, summary[0]


def test_units_contract() -> None:
    text = (REPO / "systemd" / "spoold.service").read_text()
    for line in ("Type=notify", "RestartPreventExitStatus=78", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=\n", "ReadWritePaths=/var/spool/spoold", "WatchdogSec=",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
                 "LoadCredential="):  # fmt: skip
        assert line in text, line
    assert "%i.yaml" in (REPO / "systemd" / "spoold@.service").read_text()
    assert "spoold" in (REPO / "systemd" / "spoold.sysusers").read_text()
    assert "/var/spool/spoold 2750" in (REPO / "systemd" / "spoold.tmpfiles").read_text()
    assert os.access(REPO / "systemd", os.R_OK)

