"""A real OpenSSH sshd on a free loopback port, with its own host key and one client key.

Used by tests/test_sftp.py and bench/sftp.py. It runs as the current user (root
in CI), so the config relaxes what only matters for a multi-user host.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing_reason() -> str | None:
    """Why an sshd cannot be started here, or None."""
    if not Path(SSHD).exists():
        return "OpenSSH sshd is not installed (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def keygen(path: Path) -> str:
    """Make an ed25519 key pair at `path`; return the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "spoold-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclasses.dataclass
class Sshd:
    root: Path
    port: int
    user: str
    identity: Path
    known_hosts: Path
    host_public: str
    process: subprocess.Popen[bytes]

    def url(self, path: str, port: int | None = None) -> str:
        return f"sftp://{self.user}@127.0.0.1:{port or self.port}{path}"

    def known_hosts_line(self, port: int | None = None) -> str:
        key = " ".join(self.host_public.split()[:2])
        return f"[127.0.0.1]:{port or self.port} {key}\n"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_sshd(
    root: Path, timeout: float = 10.0, *, port: int | None = None, user: str | None = None,
    authorized_keys: str | None = None,
) -> Sshd:  # fmt: skip
    """Start sshd with keys and config under `root`; return once its port accepts connections.

    `user` logs in instead of the current one; `authorized_keys` is then sshd's AuthorizedKeysFile pattern
    (`%h/.ssh/authorized_keys`), since sshd reads it as that user, who cannot enter a root-only `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    host_public = keygen(root / "host_ed25519")
    client_public = keygen(root / "id_ed25519")
    (root / "authorized_keys").write_text(client_public + "\n")
    port = port or free_port()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_public}\n")
    if os.geteuid() == 0:
        # sshd's privilege separation needs this folder when started as root.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    config = root / "sshd_config"
    keys_file = authorized_keys or root / "authorized_keys"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_ed25519'}\nPidFile none\nUsePAM no\n"
        f"StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nAuthorizedKeysFile {keys_file}\n"
        f"Subsystem sftp internal-sftp\nLogLevel ERROR\nMaxStartups 50\nMaxSessions 50\n"
    )
    log = open(root / "sshd.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                               stdin=subprocess.DEVNULL)  # fmt: skip
    log.close()
    login = user or getpass.getuser()
    server = Sshd(root, port, login, root / "id_ed25519", root / "known_hosts", host_public, process)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {(root / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sshd did not listen on port {port} within {timeout}s") from None
            time.sleep(0.05)  # a poll's interval, bounded by the deadline above: not synchronisation
