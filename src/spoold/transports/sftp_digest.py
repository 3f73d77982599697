"""Hashing files on the far side of an SFTP connection, to verify an upload before it is renamed into place.

The far host's `sha256sum` over an exec channel of the same connection when it
runs commands for us, else reading the file back over SFTP (an SFTP-only
account). Imported only by `spoold.transports.sftp`.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import shlex
from collections.abc import Mapping

import paramiko

from spoold.errors import ChecksumMismatch
from spoold.transports import ssh_exec
from spoold.transports.sftp_tree import read_back_sha256

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Exit statuses that mean the far side will not run our commands (no shell, no such tool, no exec channel).
_NO_EXEC = (126, 127, -1)


class FarDigests:
    """sha256 of far-side files on one connection; learns once whether the far side runs commands."""

    def __init__(self, ssh: paramiko.Transport, timeout: float) -> None:
        self.ssh = ssh
        # Hashing a large file on the far side can take a while before the first byte comes back.
        self.timeout = max(timeout, 600.0)
        self.can_exec: bool | None = None

    def _exec(self, command: str) -> str | None:
        """stdout of `command` on the far side, or None when it failed or the server does not run commands."""
        if self.can_exec is False:
            return None
        try:
            result = ssh_exec.run(self.ssh, command, timeout=self.timeout)
        except ssh_exec.ExecRefused:
            self.can_exec = False
            return None
        self.can_exec = result.status not in _NO_EXEC
        return result.stdout if result.status == 0 else None

    def of_files(self, client: paramiko.SFTPClient, paths: list[str]) -> dict[str, str]:
        hashed: dict[str, str] = {}
        output = self._exec("sha256sum -- " + " ".join(shlex.quote(p) for p in paths))
        for line in (output or "").splitlines():
            digest, _, name = line.partition("  ")
            if _SHA256.fullmatch(digest):
                hashed[name] = digest
        for path in paths:
            if path not in hashed:
                hashed[path] = read_back_sha256(client, path, None)
        return hashed

    def of_prefix(self, client: paramiko.SFTPClient, path: str, length: int) -> str:
        """sha256 of the first `length` bytes of `path` (a partial upload to resume)."""
        output = self._exec(f"head -c {int(length)} -- {shlex.quote(path)} | sha256sum")
        match = re.match(r"([0-9a-f]{64})\s", output or "")
        return match.group(1) if match else read_back_sha256(client, path, length)

    def verify(self, client: paramiko.SFTPClient, expected: Mapping[str, str], where: str) -> None:
        """Raise ChecksumMismatch (and remove the bad copies) unless every path hashes to its expected digest."""
        actual = self.of_files(client, list(expected))
        bad = [path for path, digest in expected.items() if actual.get(path) != digest]
        for path in bad:
            with contextlib.suppress(OSError):
                client.remove(path)
        if bad:
            raise ChecksumMismatch(f"{len(bad)} file(s) at {where} do not hash to what was sent "
                                   f"(first: {posixpath.basename(bad[0])}); they will be sent again")  # fmt: skip
