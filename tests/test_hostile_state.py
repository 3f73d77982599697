"""What producers control never reaches a terminal raw, never picks a process to signal, never supplies host keys.

- `spoold status` escapes control characters, bidi overrides and undecodable bytes in item names and error
  messages (table, single item, --watch) and prints valid JSON with --json.
- `spoold retry` signals the pid in health.json only when health.json is the daemon's and the pid is the
  daemon's `spoold run`; a forged health.json naming another process leaves that process alone.
- `ship` over SFTP without `known_hosts:` never trusts `~/.ssh/known_hosts` (the daemon's home may be the
  spool); `host_key: tofu` records into `$STATE_DIRECTORY/known_hosts`, mode 0600 in a 0700 folder.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_or_skip, read_sidecar, sidecar_state, wait_for
from tests.sshd import Sshd, keygen

WriteConfig = Callable[..., Path]
PRODUCER = "spoold-test-producer"

# Names as a producer can make them: any bytes but "/" and NUL.
HOSTILE_NAMES = [
    b"\x1b[31mred\x1b[0m.txt",
    b"\x1b]0;owned title\x07.txt",
    b"over\rwrite.txt",
    "\u202eevil\u2066txt.exe".encode(),
    b"latin1-\xff\xfe-name.txt",
]
# What the tool puts in the error message: the payload's own bytes.
HOSTILE_CONTENT = "boom \x1b[2J\x1b[31mred\x1b]0;title\x07 back\rover \u202egnp.exe \x9b31m"
RAW_FORBIDDEN = [b"\x1b", b"\x07", b"\r", "\x9b".encode(), "\u202e".encode(), "\u2066".encode(), b"\xff", b"\xfe"]


def spoold(*args: str | bytes, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, timeout=60, **kwargs)


def assert_no_raw_controls(output: bytes, allowed_prefix: bytes = b"") -> None:
    text = output.replace(allowed_prefix, b"") if allowed_prefix else output
    for raw in RAW_FORBIDDEN:
        assert raw not in text, f"raw {raw!r} reached the terminal: {text[:2000]!r}"


def drop_bytes(inbox: Path, name: bytes, data: bytes) -> None:
    """Write an item whose name is raw bytes, complete at once (a hidden temp name, then rename)."""
    folder = os.fsencode(inbox)
    tmp = os.path.join(folder, b".incoming.tmp")
    with open(tmp, "wb") as stream:
        stream.write(data)
    os.rename(tmp, os.path.join(folder, name))


@pytest.fixture
def echo_tool(tmp_path: Path) -> Path:
    """Fails with the item's name and content on stderr: producer text in the error message."""
    tool = tmp_path / "echo_fail.py"
    tool.write_text(
        textwrap.dedent("""\
        import os, sys
        payload = os.environ["SPOOLD_PAYLOAD"]
        with open(payload, "rb") as stream:
            data = stream.read()
        sys.stderr.buffer.write(b"cannot take " + os.fsencode(os.environ["SPOOLD_ITEM"]) + b": " + data + b"\\n")
        sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(__file__), "fixed")) else 1)
        """)
    )
    return tool


def echo_config(write_config: WriteConfig, tool: Path, rescan: str = "60s") -> Path:
    return write_config(f"""\
        spool: {{spool}}
        rescan: {rescan}
        queues:
          q:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{tool}']}}
        """)


# ---- (a) status output --------------------------------------------------------------------------------------


def test_status_escapes_names_and_messages_from_a_running_daemon(
    tmp_path: Path, spool: Path, daemon: Any, write_config: WriteConfig, echo_tool: Path
) -> None:
    config = echo_config(write_config, echo_tool)
    daemon(config)
    for name in HOSTILE_NAMES:
        drop_bytes(spool / "q" / "inbox", name, HOSTILE_CONTENT.encode())
    for name in HOSTILE_NAMES:
        wait_for(sidecar_state(spool, "q", os.fsdecode(name), "failed"), 20, f"{name!r} failed")

    for args in (["status", "-c", str(config)], ["status", "-c", str(config), "q"]):
        table = spoold(*args)
        assert table.returncode == 0, table.stderr
        assert_no_raw_controls(table.stdout + table.stderr)
        assert b"\\x1b[31mred\\x1b[0m.txt" in table.stdout
        assert b"\\x1b]0;owned title\\x07.txt" in table.stdout
        assert b"over\\rwrite.txt" in table.stdout
        assert b"\\u202eevil\\u2066txt.exe" in table.stdout
        assert b"latin1-\\xff\\xfe-name.txt" in table.stdout, "an undecodable byte is shown as \\xNN"

    one = spoold("status", "-c", str(config), "q", os.fsencode("\x1b[31mred\x1b[0m.txt"))
    assert one.returncode == 0, one.stderr
    assert_no_raw_controls(one.stdout + one.stderr)
    assert b"q/\\x1b[31mred\\x1b[0m.txt: failed" in one.stdout
    assert b"boom \\x1b[2J\\x1b[31mred\\x1b]0;title\\x07 back\\rover \\u202egnp.exe \\x9b31m" in one.stdout

    odd = spoold("status", "-c", str(config), "q", b"latin1-\xff\xfe-name.txt")
    assert odd.returncode == 0, odd.stderr
    assert_no_raw_controls(odd.stdout + odd.stderr)
    assert b"q/latin1-\\xff\\xfe-name.txt: failed" in odd.stdout

    as_json = spoold("status", "-c", str(config), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert_no_raw_controls(as_json.stdout)
    data = json.loads(as_json.stdout)
    names = {item["item"] for item in data["queues"]["q"]["items"]}
    assert names == {os.fsdecode(n) for n in HOSTILE_NAMES}, "--json keeps the full names (escaped as JSON)"
    item_json = spoold("status", "-c", str(config), "q", HOSTILE_NAMES[0], "--json")
    assert_no_raw_controls(item_json.stdout)
    assert HOSTILE_CONTENT in json.loads(item_json.stdout)["error"]["message"]


def write_sidecar(spool: Path, queue: str, document: dict[str, Any]) -> None:
    """A sidecar as a JSON file holds it: `\\u001b` for ESC, `\\udcff` for an undecodable byte of the name."""
    status = spool / queue / "status"
    status.mkdir(parents=True, exist_ok=True)
    name = os.fsencode(document["item"]) + b".json"
    with open(os.path.join(os.fsencode(status), name), "w", encoding="ascii") as stream:
        json.dump(document, stream)


@pytest.mark.planted_sidecars
def test_status_escapes_a_sidecar_as_written_and_caps_long_values(
    tmp_path: Path, spool: Path, write_config: WriteConfig
) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            chain:
              - checksum: {}
        """)
    long_message = "x" * 50_000 + "\x1b[31m"
    item = "\x1b]0;title\x07name\udcff\udcfe\x1b[31m\r\u202e"
    write_sidecar(spool, "q", {
        "schema": "spoold.status/1", "queue": "q", "item": item, "original_name": item + "\x1b[1m",
        "kind": "file", "state": "failed", "step": "checksum", "fields": {"note": "\x1b[5mblink\u2067"},
        "steps": [{"name": "checksum", "state": "failed", "attempt": 2, "error": {"message": long_message}}],
        "attempts": 2, "next_attempt_at": None, "error": {"step": "checksum", "type": "x", "message": long_message,
                                                          "retryable": False},
    })  # fmt: skip
    raw = next((spool / "q" / "status").iterdir()).read_bytes()
    assert b"\\udcff" in raw and b"\\u001b" in raw

    table = spoold("status", "-c", str(config), "q", env={**os.environ, "COLUMNS": "100"})
    assert table.returncode == 0, table.stderr
    assert_no_raw_controls(table.stdout + table.stderr)
    assert "\\x1b]0;title\\x07name\\xff\\xfe…".encode() in table.stdout, "cut, never inside an escape"
    assert all(len(line) < 400 for line in table.stdout.splitlines()), "the table caps a 50,000-character message"

    one = spoold("status", "-c", str(config), "q", os.fsencode(item))
    assert one.returncode == 0, one.stderr
    assert_no_raw_controls(one.stdout + one.stderr)
    assert b"dropped as: \\x1b]0;title\\x07name\\xff\\xfe\\x1b[31m\\r\\u202e\\x1b[1m" in one.stdout
    assert b"\\u2067" in one.stdout and b"blink" in one.stdout
    assert all(len(line) < 2100 for line in one.stdout.splitlines()), "the item view caps long values too"

    full = json.loads(spoold("status", "-c", str(config), "q", os.fsencode(item), "--json").stdout)
    assert full["error"]["message"] == long_message and full["item"] == item, "--json holds the full values"


def test_status_watch_escapes_too(tmp_path: Path, spool: Path, daemon: Any, write_config: WriteConfig,
                                  echo_tool: Path) -> None:  # fmt: skip
    config = echo_config(write_config, echo_tool)
    daemon(config)
    drop_bytes(spool / "q" / "inbox", HOSTILE_NAMES[0], HOSTILE_CONTENT.encode())
    wait_for(sidecar_state(spool, "q", os.fsdecode(HOSTILE_NAMES[0]), "failed"), 20, "failed")
    for index, args in enumerate((["q"], ["q", HOSTILE_NAMES[0]])):
        out = tmp_path / f"watch{index}.out"
        with open(out, "wb") as stream:
            watcher = subprocess.Popen([sys.executable, "-m", "spoold", "status", "-c", str(config), "--watch",
                                        *args], stdout=stream, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_for(lambda out=out: out.read_bytes().count(b"(refreshing every") >= 2, 15, "two redraws")
        finally:
            watcher.terminate()
            watcher.wait(timeout=10)
        screen = out.read_bytes()
        assert b"\\x1b[31mred\\x1b[0m.txt" in screen
        assert_no_raw_controls(screen, allowed_prefix=b"\x1b[H\x1b[2J")


# ---- (b) retry signals only the daemon ----------------------------------------------------------------------


@pytest.fixture
def producer() -> Iterator[pwd.struct_passwd]:
    """An unprivileged system user, removed again whatever the test does."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throw-away producer user and chown files to it")
    if shutil.which("useradd") is None:
        need_or_skip("useradd is not installed")
    subprocess.run(["userdel", PRODUCER], capture_output=True)  # left over by an interrupted run
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PRODUCER],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield pwd.getpwnam(PRODUCER)
    finally:
        subprocess.run(["userdel", PRODUCER], check=True, capture_output=True)


@pytest.fixture
def victims() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes that SIGUSR1 would kill; every one is stopped at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def sigusr1_pending(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)):
            return True
    return False


def assert_never_got_sigusr1(process: subprocess.Popen[bytes]) -> None:
    assert process.poll() is None, f"pid {process.pid} ended with {process.returncode}: it was signalled"
    assert not sigusr1_pending(process.pid), f"SIGUSR1 is pending for pid {process.pid}"
    # A SIGUSR1 sent before this SIGTERM would be taken first (lower number) and end it with -SIGUSR1.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == -signal.SIGTERM


def failed_item_with_stopped_daemon(spool: Path, daemon: Any, config: Path) -> None:
    run = daemon(config)
    (spool / "q" / "inbox" / "job.txt").write_text("job")
    wait_for(sidecar_state(spool, "q", "job.txt", "failed"), 20, "job failed")
    assert run.stop() == 0


def forge_health(spool: Path, pid: int, uid: int = 0, mode: int = 0o644) -> None:
    health = spool / "health.json"
    health.unlink(missing_ok=True)
    health.write_text(json.dumps({"schema": "spoold.health/1", "pid": pid, "ready": True}))
    os.chown(health, uid, -1)
    os.chmod(health, mode)


@pytest.mark.planted_sidecars
@pytest.mark.parametrize("forgery", ["owned-by-producer", "group-writable", "not-spoold", "producer-process"])
def test_retry_does_not_signal_a_forged_pid(
    forgery: str, tmp_path: Path, spool: Path, daemon: Any, write_config: WriteConfig, echo_tool: Path,
    producer: pwd.struct_passwd, victims: Callable[..., subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    config = echo_config(write_config, echo_tool)
    failed_item_with_stopped_daemon(spool, daemon, config)
    if forgery == "producer-process":
        # Looks like the daemon by its command line, but runs as the producer: a producer could start this.
        victim = victims(
            ["/usr/bin/python3", "-c", "import signal; signal.pause()", "spoold", "run", "-c", str(config)],
            user=producer.pw_uid,
            group=producer.pw_gid,
            extra_groups=[],
            cwd="/",
        )
        assert Path(f"/proc/{victim.pid}").stat().st_uid == producer.pw_uid
        forge_health(spool, victim.pid)
    else:
        victim = victims(["sleep", "60"])
        if forgery == "owned-by-producer":
            forge_health(spool, victim.pid, uid=producer.pw_uid)
        elif forgery == "group-writable":
            forge_health(spool, victim.pid, mode=0o666)
        else:
            forge_health(spool, victim.pid)  # the daemon's file, but the pid is not `spoold run`
    result = spoold("retry", "-c", str(config), "q", "--all")
    assert result.returncode == 0, result.stderr
    assert b"q/job.txt: queued again" in result.stdout
    assert result.stderr == b"", "skipping the nudge says nothing alarming"
    assert_never_got_sigusr1(victim)


def test_retry_still_nudges_the_real_daemon(tmp_path: Path, spool: Path, daemon: Any, write_config: WriteConfig,
                                            echo_tool: Path) -> None:  # fmt: skip
    # With an hour between rescans, the item is taken up again within seconds only if the daemon is signalled.
    config = echo_config(write_config, echo_tool, rescan="1h")
    run = daemon(config)
    (spool / "q" / "inbox" / "job.txt").write_text("job")
    wait_for(sidecar_state(spool, "q", "job.txt", "failed"), 20, "job failed")
    (tmp_path / "fixed").touch()
    result = spoold("retry", "-c", str(config), "q", "--all")
    assert result.returncode == 0, result.stderr
    wait_for(sidecar_state(spool, "q", "job.txt", "done"), 15, "done soon after retry: the daemon was nudged")
    assert run.process.poll() is None


# ---- (c) host keys never come from $HOME -------------------------------------------------------------------


def ship_config(write_config: WriteConfig, sshd: Sshd, dest: Path, **options: Any) -> Path:
    step = {"to": sshd.url(f"{dest}/"), "identity": str(sshd.identity), **options}
    return write_config(f"""\
        spool: {{spool}}
        queues:
          out:
            settle: 0s
            chain:
              - ship: {json.dumps(step)}
        """)


def plant_known_hosts(folder: Path, sshd: Sshd) -> Path:
    """A known_hosts with the server's real key, where a producer or an unwary default could put it."""
    (folder / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
    planted = folder / ".ssh" / "known_hosts"
    planted.write_text(sshd.known_hosts_line())
    planted.chmod(0o600)
    return planted


def drop(spool: Path, name: str, data: bytes) -> None:
    inbox = spool / "out" / "inbox"
    (inbox / f".{name}.tmp").write_bytes(data)
    os.rename(inbox / f".{name}.tmp", inbox / name)


@pytest.mark.parametrize("home", ["spool", "elsewhere"])
def test_strict_without_known_hosts_ignores_home(
    home: str, tmp_path: Path, spool: Path, sshd: Sshd, daemon: Any, write_config: WriteConfig
) -> None:
    spool.mkdir()
    home_folder = spool if home == "spool" else tmp_path / "home"
    plant_known_hosts(spool, sshd)
    plant_known_hosts(home_folder, sshd)
    state = tmp_path / "state"
    dest = tmp_path / "remote"
    # SPOOLD_KNOWN_HOSTS empty: the real default, /etc/spoold/known_hosts, which cannot hold this fresh key.
    daemon(ship_config(write_config, sshd, dest),
           env={"HOME": str(home_folder), "STATE_DIRECTORY": str(state), "SPOOLD_KNOWN_HOSTS": ""})  # fmt: skip
    drop(spool, "x.bin", b"secret data")
    doc = wait_for(sidecar_state(spool, "out", "x.bin", "failed"), 30, "refused")
    error = doc["error"]
    assert error["retryable"] is False
    assert "unknown host key" in error["message"] and f"[127.0.0.1]:{sshd.port}" in error["message"]
    assert "SHA256:" in error["message"] and "/etc/spoold/known_hosts" in error["message"]
    assert not dest.exists(), "nothing was sent to an unverified host"
    assert not state.exists(), "strict checking records nothing"


def test_tofu_without_known_hosts_records_in_the_state_directory(
    tmp_path: Path, spool: Path, sshd: Sshd, daemon: Any, write_config: WriteConfig
) -> None:
    spool.mkdir()
    plant_known_hosts(spool, sshd)
    state = tmp_path / "var-lib" / "spoold"
    dest = tmp_path / "remote"
    daemon(ship_config(write_config, sshd, dest, host_key="tofu"),
           env={"HOME": str(spool), "STATE_DIRECTORY": str(state), "SPOOLD_KNOWN_HOSTS": ""})  # fmt: skip
    drop(spool, "a.bin", b"a")
    wait_for(sidecar_state(spool, "out", "a.bin", "done"), 30, "shipped on first use")
    recorded = state / "known_hosts"
    assert recorded.read_text() == sshd.known_hosts_line()
    info = recorded.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    drop(spool, "b.bin", b"b")
    wait_for(sidecar_state(spool, "out", "b.bin", "done"), 30, "shipped with the recorded key")
    assert recorded.read_text() == sshd.known_hosts_line(), "recorded once"
    assert (dest / "a.bin").read_bytes() == b"a" and (dest / "b.bin").read_bytes() == b"b"


@pytest.mark.parametrize("planted", ["impostor-key", "symlink"])
def test_tofu_state_file_is_checked_and_never_followed(
    planted: str, tmp_path: Path, spool: Path, sshd: Sshd, daemon: Any, write_config: WriteConfig
) -> None:
    spool.mkdir()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if planted == "impostor-key":
        other = keygen(tmp_path / "impostor")
        (state / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
        (state / "known_hosts").chmod(0o600)
    else:
        # A link to a file holding the real key: trusting it would mean reading through a link.
        (state / "known_hosts").symlink_to(plant_known_hosts(spool, sshd))
    dest = tmp_path / "remote"
    daemon(ship_config(write_config, sshd, dest, host_key="tofu"),
           env={"HOME": str(spool), "STATE_DIRECTORY": str(state), "SPOOLD_KNOWN_HOSTS": ""})  # fmt: skip
    drop(spool, "x.bin", b"x")
    doc = wait_for(sidecar_state(spool, "out", "x.bin", "failed"), 30, "refused")
    assert doc["error"]["retryable"] is False
    expected = "CHANGED" if planted == "impostor-key" else "cannot read known_hosts"
    assert expected in doc["error"]["message"]
    assert str(state / "known_hosts") in doc["error"]["message"]
    assert not dest.exists()
    assert read_sidecar(spool, "out", "x.bin") is not None
