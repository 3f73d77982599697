"""Log records to journald over its native protocol, with structured fields.

spoold speaks the protocol itself rather than through python-systemd
(`systemd-python` on PyPI): that package ships no wheels, so every install
would compile it against libsystemd-dev with a C toolchain, which a 512 MB
board's venv should not need (Debian's python3-systemd serves only the system
Python, not a venv), while the protocol is a few lines (documented in
systemd's "Native Journal Protocol"): one AF_UNIX datagram per record to
`/run/systemd/journal/socket`, each field `KEY=value\\n`, or, for a value that
holds a newline, `KEY\\n`, its length as 64-bit little-endian, the value, `\\n`.
A record too large for one datagram (EMSGSIZE) goes, as sd_journal_sendv does
it, in a sealed memfd passed with SCM_RIGHTS: nothing is truncated.

When the socket cannot be written (journald restarting, no journal in a
container, a sandbox refusing memfd_create), the record goes to stderr with
its `<priority>` prefix, which journald reads from the service's stream: a
record is never lost, and logging never raises.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable

from spoold.redact import redact

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Where to send instead of journald's socket: for tests, which stand a datagram socket of their own there.
SOCKET_ENV = "SPOOLD_JOURNAL_SOCKET"
IDENTIFIER = "spoold"
SEND_TIMEOUT_SECONDS = 1.0
# sd-journal asks for this much; the kernel caps it at net.core.wmem_max, and larger records go by memfd.
SEND_BUFFER_BYTES = 8 * 1024 * 1024
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
# The record attributes `logs.ItemFieldsFilter` sets, and the journal fields they become.
ITEM_FIELDS = (("spoold_queue", "SPOOLD_QUEUE"), ("spoold_item", "SPOOLD_ITEM"), ("spoold_step", "SPOOLD_STEP"))


def priority(levelno: int) -> int:
    """The syslog priority journald files a Python log level under."""
    for threshold, value in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if levelno >= threshold:
            return value
    return 7


def is_journal_stream(fd: int = 2) -> bool:
    """True when `fd` is the stream systemd connected to the journal (`$JOURNAL_STREAM` is `device:inode`).

    systemd passes the variable on to children whose stderr may since have been redirected elsewhere, so
    only a match with the descriptor itself says the journal reads it.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _encoded(value: str) -> bytes:
    # Item names that are not UTF-8 are kept as surrogates; the journal stores the original bytes.
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """Fields in the native protocol's serialization, each value redacted."""
    parts: list[bytes] = []
    for key, value in fields:
        data = _encoded(redact(value))
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    """One datagram socket to journald, opened on first use; `send` raises OSError when journald cannot take it."""

    def __init__(self, path: str | None = None, send_buffer_bytes: int = SEND_BUFFER_BYTES) -> None:
        self.path = path or os.environ.get(SOCKET_ENV) or JOURNAL_SOCKET
        self.send_buffer_bytes = send_buffer_bytes
        self._socket: socket.socket | None = None

    def _connected(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            self._socket = sock
        return self._socket

    def send(self, payload: bytes) -> None:
        sock = self._connected()
        try:
            sock.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(sock, payload)

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        fd = os.memfd_create("spoold-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with memoryview(payload) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            # journald takes a descriptor only when sealed: it reads what we wrote, and nothing else.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class JournalHandler(logging.Handler):
    """Sends each record to journald with its fields; on any failure, hands it to `fallback` (stderr)."""

    def __init__(self, fallback: logging.Handler, sender: JournalSender | None = None) -> None:
        super().__init__()
        self.fallback = fallback
        self.sender = sender or JournalSender()
        self._message = logging.Formatter("%(message)s")

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        fields = [
            ("MESSAGE", self._message.format(record)),
            ("PRIORITY", str(priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", IDENTIFIER),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            # Handlers run in the thread that logs: this is the thread the record is about.
            ("TID", str(threading.get_native_id())),
            ("SPOOLD_LOGGER", record.name),
        ]
        if record.funcName:  # None for a record made by hand
            fields.append(("CODE_FUNC", record.funcName))
        for attribute, key in ITEM_FIELDS:
            value = getattr(record, attribute, None)
            if value is not None:
                fields.append((key, str(value)))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender.send(encode(self.fields(record)))
        except Exception:  # noqa: BLE001 - never lose a record, never raise from logging: stderr takes it
            self.fallback.emit(record)

    def close(self) -> None:
        self.sender.close()
        self.fallback.close()
        super().close()
