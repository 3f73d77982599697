"""Servers that lie, for tests/test_hostile_remote.py: an SFTP server built on paramiko's server classes.

`EvilSftpServer` listens on a free 127.0.0.1 port, accepts one password, and
serves a made-up tree (`EvilTree`): any listing the test writes (names with
`..`, `/`, NUL, 300 bytes, symlinks, endless nesting, sizes that lie), and
for any path that is not a folder the same small content, so a client that
trusted the names would really write where they point. It records every path
opened for reading, so a test can show a symlink entry was never fetched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import paramiko

PASSWORD = "evil-test-password"
CONTENT = b"written by the hostile server\n"


def attrs(name: str | bytes, mode: int, size: int = len(CONTENT)) -> paramiko.SFTPAttributes:
    """One listing entry; `name` as bytes goes on the wire as is (not UTF-8 if so chosen)."""
    entry = paramiko.SFTPAttributes()
    entry.filename = name  # type: ignore[assignment]
    entry.st_mode = mode
    entry.st_size = size
    entry.st_uid = entry.st_gid = 0
    entry.st_atime = entry.st_mtime = int(time.time())
    return entry


def regular(name: str | bytes, size: int = len(CONTENT)) -> paramiko.SFTPAttributes:
    return attrs(name, stat.S_IFREG | 0o644, size)


def folder(name: str | bytes) -> paramiko.SFTPAttributes:
    return attrs(name, stat.S_IFDIR | 0o755, 4096)


def symlink(name: str) -> paramiko.SFTPAttributes:
    return attrs(name, stat.S_IFLNK | 0o777, 11)  # as lstat reports a link to /etc/passwd


@dataclasses.dataclass
class EvilTree:
    """Folder path -> its listing; every other path reads as CONTENT."""

    folders: dict[str, list[paramiko.SFTPAttributes]] = dataclasses.field(default_factory=dict)
    opened: list[str] = dataclasses.field(default_factory=list)
    listed: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, path: str, entries: list[paramiko.SFTPAttributes]) -> None:
        self.folders[path.rstrip("/") or "/"] = entries

    def lookup(self, path: str) -> paramiko.SFTPAttributes:
        path = path.rstrip("/") or "/"
        if path in self.folders or path == "/":
            return folder(os.path.basename(path))
        parent, name = os.path.split(path)
        for entry in self.folders.get(parent, []):
            if entry.filename == name:
                return entry
        return regular(name)


class _Handle(paramiko.SFTPHandle):
    def __init__(self, data: bytes, entry: paramiko.SFTPAttributes) -> None:
        super().__init__()
        self.data, self.entry = data, entry

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def stat(self) -> paramiko.SFTPAttributes:
        return self.entry


class _Sftp(paramiko.SFTPServerInterface):
    def __init__(self, server: Any, *args: Any, tree: EvilTree, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.tree = tree

    def list_folder(self, path: str) -> Any:
        with self.tree.lock:
            self.tree.listed.append(path)
        entries = self.tree.folders.get(path.rstrip("/") or "/")
        return paramiko.SFTP_NO_SUCH_FILE if entries is None else list(entries)

    def stat(self, path: str) -> Any:
        return self.tree.lookup(path)

    def lstat(self, path: str) -> Any:
        return self.tree.lookup(path)

    def open(self, path: str, flags: int, attr: Any) -> Any:
        if flags & (os.O_WRONLY | os.O_RDWR):
            return paramiko.SFTP_PERMISSION_DENIED
        with self.tree.lock:
            self.tree.opened.append(path)
        return _Handle(CONTENT, self.tree.lookup(path))

    def canonicalize(self, path: str) -> str:
        return path


class _Auth(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return paramiko.AUTH_SUCCESSFUL if password == PASSWORD else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class EvilSftpServer:
    """A paramiko SFTP server on 127.0.0.1 serving `tree`; `close()` stops it and every connection."""

    def __init__(self, host_key: paramiko.PKey, tree: EvilTree) -> None:
        self.host_key, self.tree = host_key, tree
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self._transports: list[paramiko.Transport] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="evil-sftp", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(self.host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _Sftp, tree=self.tree)
            self._transports.append(transport)
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                # With an event, negotiation runs on the transport's thread and the next client is not kept waiting.
                transport.start_server(event=threading.Event(), server=_Auth())

    def url(self, path: str) -> str:
        return f"sftp://spoold@127.0.0.1:{self.port}{path}"

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key.get_name()} {self.host_key.get_base64()}\n"

    def write_client_files(self, folder: Path) -> dict[str, str]:
        """known_hosts and a password file under `folder`; the connection options for a step."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "known_hosts").write_text(self.known_hosts_line())
        (folder / "password").write_text(PASSWORD + "\n")
        return {"known_hosts": str(folder / "known_hosts"), "password_file": str(folder / "password")}

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=10)
        for transport in self._transports:
            transport.close()
        for transport in self._transports:
            transport.join(timeout=10)
