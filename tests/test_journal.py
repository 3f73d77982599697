"""Log records to journald's native protocol: a datagram socket stands in for /run/systemd/journal/socket."""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spoold.daemon.journal import JournalHandler, JournalSender
from spoold.daemon.logs import JournalFormatter
from tests.conftest import DaemonProcess, sidecar_state, wait_for

Record = dict[str, list[bytes]]
# journald's rule for a field a client may set: upper case, digits and _, not first a _, at most 64.
FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")

STEP_SCRIPT = """\
import sys
if sys.argv[1].startswith("bad"):
    sys.stderr.write("line one\\nline two\\npassword=hunter2\\n")
    sys.exit(1)
"""

CONFIG = """\
spool: {spool}
queues:
  q:
    settle: 0.1s
    chain:
      - exec: {argv: [PYTHON, '{tmp}/step.py', '{name}']}
"""


def parse(data: bytes) -> Record:
    """One datagram in the native protocol: `KEY=value\\n`, or `KEY\\n` + 64-bit LE length + value + `\\n`."""
    fields: Record = {}
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            at = end + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n", "a binary value ends with a newline"
            at = end + 10 + size
        assert FIELD_NAME.fullmatch(key.decode()), key
        fields.setdefault(key.decode(), []).append(value)
    return fields


class FakeJournal:
    """A bound AF_UNIX datagram socket that keeps what it receives; a passed descriptor is read as journald does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.records: list[Record] = []
        self.passed_fds = 0
        self.seals: list[int] = []

    def drain(self) -> list[Record]:
        fd_space = socket.CMSG_LEN(array.array("i").itemsize)
        while True:
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(1 << 20, fd_space)
            except BlockingIOError:
                return self.records
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = array.array("i", payload)[0]
                    self.seals.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
                    with os.fdopen(fd, "rb") as passed:
                        data = passed.read() if passed.seek(0) == 0 else b""  # journald maps it from offset 0
                    self.passed_fds += 1
            self.records.append(parse(data))

    def about(self, item: str) -> list[Record]:
        return [r for r in self.drain() if r.get("SPOOLD_ITEM") == [item.encode()]]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(tmp_path / "journal.sock")
    yield fake
    fake.close()


def one(record: Record, key: str) -> str:
    values = record.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0].decode()


def test_each_record_about_an_item_carries_its_fields(
    write_config: Callable[[str], Path], daemon: Callable[..., DaemonProcess], spool: Path, tmp_path: Path,
    journal: FakeJournal,
) -> None:  # fmt: skip
    (tmp_path / "step.py").write_text(STEP_SCRIPT)
    # The daemon's stderr is this file (conftest names it): JOURNAL_STREAM says it is the journal's stream.
    log = tmp_path / "daemon0.log"
    log.touch()
    st = log.stat()
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "SPOOLD_JOURNAL_SOCKET": str(journal.path)}
    process = daemon(write_config(CONFIG.replace("PYTHON", sys.executable)), env=env, wait=False)
    wait_for(lambda: any(b"spoold started" in m for r in journal.drain() for m in r["MESSAGE"]), 15, "started")
    inbox = spool / "q" / "inbox"
    (inbox / "ok.bin").write_bytes(b"fine")
    (inbox / "bad.bin").write_bytes(b"doomed")

    def ended(item: str, words: str) -> Record | None:
        return next((r for r in journal.about(item) if words.encode() in r["MESSAGE"][0]), None)

    done = wait_for(lambda: ended("ok.bin", "q/ok.bin: done"), 15, "ok.bin's done in the journal")
    failure = wait_for(lambda: ended("bad.bin", "exec failed"), 15, "bad.bin's failure in the journal")
    wait_for(sidecar_state(spool, "q", "bad.bin", "failed"), 5, "bad.bin failed")

    # The main loop's record of the item's end, and the runner's of its step.
    assert (one(done, "SPOOLD_QUEUE"), one(done, "PRIORITY"), one(done, "SYSLOG_IDENTIFIER")) == ("q", "6", "spoold")
    assert "SPOOLD_STEP" not in done
    assert (one(failure, "SPOOLD_QUEUE"), one(failure, "SPOOLD_STEP"), one(failure, "PRIORITY")) == ("q", "exec", "3")
    # The failure's message holds the program's last lines: newlines travel in the binary form, secrets do not.
    message = one(failure, "MESSAGE")
    assert "line one\nline two\npassword=***" in message, message
    assert one(failure, "CODE_FILE").endswith(".py") and one(failure, "CODE_LINE").isdigit()

    # `journalctl SPOOLD_ITEM=bad.bin` tells its story: claimed, the program's output, the failure.
    story = [one(r, "MESSAGE") for r in journal.about("bad.bin")]
    assert story[0] == "q/bad.bin: claimed", story
    output = [r for r in journal.about("bad.bin") if one(r, "SPOOLD_LOGGER") == "spoold.exec"]
    assert [one(r, "MESSAGE").split(": ", 1)[1] for r in output] == ["line one", "line two", "password=***"], output
    assert all(one(r, "SPOOLD_STEP") == "exec" for r in output)

    started = next(r for r in journal.drain() if b"spoold started" in r["MESSAGE"][0])
    assert "SPOOLD_ITEM" not in started and "SPOOLD_QUEUE" not in started
    assert not any(b"hunter2" in value for r in journal.drain() for values in r.values() for value in values)
    # Every record went to the journal's socket, none to stderr.
    process.stop()
    assert journal.passed_fds == 0
    assert process.log() == "", process.log()


def test_a_record_too_large_for_a_datagram_goes_in_a_memfd(journal: FakeJournal) -> None:
    fallback = logging.StreamHandler(io.StringIO())
    handler = JournalHandler(fallback, JournalSender(str(journal.path), send_buffer_bytes=64 * 1024))
    big = "x" * (1 << 20) + "\nend token=abc123"
    record = logging.LogRecord("spoold.test", logging.WARNING, __file__, 1, "%s", (big,), None)
    record.spoold_queue, record.spoold_item = "q", "i\nj"
    handler.handle(record)
    handler.close()
    (received,) = journal.drain()
    assert journal.passed_fds == 1
    # journald takes a descriptor only when it is a memfd sealed against any change.
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert journal.seals[0] & seals == seals
    assert one(received, "MESSAGE") == "x" * (1 << 20) + "\nend token=***"
    fields = (one(received, "PRIORITY"), one(received, "SPOOLD_QUEUE"), one(received, "SPOOLD_ITEM"))
    assert fields == ("4", "q", "i\nj")
    assert "SPOOLD_STEP" not in received


def test_a_record_the_journal_cannot_take_goes_to_stderr(tmp_path: Path) -> None:
    stream = io.StringIO()
    fallback = logging.StreamHandler(stream)
    fallback.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    handler = JournalHandler(fallback, JournalSender(str(tmp_path / "nobody.sock")))
    handler.handle(logging.LogRecord("spoold", logging.ERROR, __file__, 1, "two\nlines", None, None))
    handler.close()
    assert stream.getvalue() == "<3>spoold: two | lines\n"
