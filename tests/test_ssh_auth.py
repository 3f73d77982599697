"""Authentication over a real sshd: a refused key is permanent, a link lost during authentication is not."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import paramiko
import pytest

from spoold.errors import PermanentError, TransientError
from spoold.transports.ssh_connect import authenticate
from tests.conftest import wait_for
from tests.netproxy import Proxy
from tests.sshd import Sshd, keygen


def started_client(port: int) -> paramiko.Transport:
    ssh = paramiko.Transport(socket.create_connection(("127.0.0.1", port), timeout=10))
    ssh.start_client(timeout=10)
    return ssh


def test_a_link_cut_during_authentication_is_transient(sshd: Sshd) -> None:
    proxy = Proxy(sshd.port)
    ssh = started_client(proxy.port)
    try:
        proxy.wedge()  # the server never answers the authentication request ...
        raised: list[BaseException] = []

        def attempt() -> None:
            try:
                authenticate(ssh, sshd.user, "127.0.0.1", {"identity": str(sshd.identity)})
            except BaseException as exc:  # handed to the test thread
                raised.append(exc)

        worker = threading.Thread(target=attempt)
        worker.start()
        wait_for(lambda: ssh.auth_handler is not None, 10, "the authentication request to be sent")
        assert proxy.cut() == 1  # ... and then the link goes down
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert len(raised) == 1 and isinstance(raised[0], TransientError), raised
        assert "lost during authentication" in str(raised[0])
    finally:
        ssh.close()
        proxy.close()


def test_a_refused_key_is_permanent(sshd: Sshd, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    ssh = started_client(sshd.port)
    try:
        with pytest.raises(PermanentError, match="refused"):
            authenticate(ssh, sshd.user, "127.0.0.1", {"identity": str(tmp_path / "stranger")})
    finally:
        ssh.close()
