"""An SFTP upload whose link goes silent mid-transfer times out instead of waiting for TCP to give up.

Found by `make torture` (torture/network.py, a 75 s blackhole on a veth link): with small socket buffers
(any slow real link) paramiko's send retries a full socket for as long as the transport is open, below the
channel timeout, so the attempt sat through the whole blackhole. The proxy here stops reading from the
client (its buffers fill, nothing is reset), as a dead link does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from spoold.errors import TransientError
from spoold.transports.base import parse_url
from spoold.transports.sftp import SftpTransport
from spoold.transports.transfer import TransferContext
from tests.sshd import Sshd

MiB = 1 << 20
SMALL = 32 << 10


class StallingProxy:
    """Forwards to `target` until `stalled` is set, then reads nothing more from the client."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port: int = self.listener.getsockname()[1]
        self.forwarded = 0
        self.stalled = threading.Event()
        self.closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                server.settimeout(None)
                threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while not self.closing.is_set():
                if upstream and self.stalled.is_set():
                    self.closing.wait(0.05)  # stalled until un-stalled, or closed
                    continue
                if not (data := source.recv(65536)):
                    break
                sink.sendall(data)
                if upstream:
                    self.forwarded += len(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


def test_a_silent_link_times_out_an_upload(sshd: Sshd, tmp_path: Path) -> None:
    proxy = StallingProxy(sshd.port)
    known_hosts = tmp_path / "known_hosts_proxy"
    known_hosts.write_text(sshd.known_hosts_line(proxy.port))
    far = tmp_path / "far"
    far.mkdir()
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(64 * MiB))
    transport = SftpTransport(parse_url(f"sftp://{sshd.user}@127.0.0.1:{proxy.port}{far}/"),
                              {"identity": str(sshd.identity), "known_hosts": str(known_hosts)})  # fmt: skip
    transport._io_timeout = 2.0  # the floor is 30 s; the watch is the same

    def progress(_done: int, _total: int) -> None:
        ssh = transport._ssh
        if ssh is not None and ssh.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > 4 * SMALL:
            ssh.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)  # a slow link's buffer, not loopback's
        if proxy.forwarded > 4 * MiB:
            proxy.stalled.set()

    ctx = TransferContext(progress=progress, checkpoint={}, save_checkpoint=lambda: None, check_stop=lambda: None)
    raised: list[BaseException] = []

    def upload() -> None:
        try:
            transport.put_file(source, f"{far}/big.bin", {}, ctx)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    try:
        worker.join(timeout=20)
        assert not worker.is_alive(), "the upload still waits on the silent link"
        assert proxy.stalled.is_set()
        assert len(raised) == 1 and isinstance(raised[0], TransientError), raised
        assert "timed out" in str(raised[0])
    finally:
        transport.close()
        proxy.close()
