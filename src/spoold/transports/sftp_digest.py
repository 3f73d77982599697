"""Hashing files on the far side of an SFTP connection, to verify an upload before it is renamed into place.

Once per connection the far host is asked (one exec channel) which digest tools
it has; the fastest is used from then on: `xxh128sum` (xxh3_128) or `b3sum`
(blake3, when this side can compute it too), which the upload then computes
while sending, else sha256 by `openssl dgst`, `python3` (hashlib) or
`sha256sum`. A tool that gives no usable answer is dropped for the next one; an
account that runs no commands (SFTP only) or a host without any of them is
verified by reading the file back. A tool that answers with a wrong digest is a
mismatch, never a reason to believe the file. Paths are shell-quoted. Imported
only by `spoold.transports`' SFTP modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import posixpath
import re
import shlex
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import paramiko
import xxhash

from spoold.errors import ChecksumMismatch
from spoold.transports import ssh_exec
from spoold.transports.sftp_tree import read_back_sha256

# Exit statuses that mean the far side will not run our commands (no shell, no such tool, no exec channel).
_NO_EXEC = (126, 127, -1)
_PYTHON_FILES = ("import hashlib,sys\nfor p in sys.argv[1:]:\n try:\n  h=hashlib.sha256()\n  f=open(p,'rb')\n"
                 "  for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n  print(h.hexdigest())\n except OSError:\n"
                 "  print('-')\n")  # fmt: skip
_PYTHON_STDIN = ("import hashlib,sys\nh=hashlib.sha256()\nfor b in iter(lambda:sys.stdin.buffer.read(1<<20),b''):"
                 "h.update(b)\nprint(h.hexdigest())\n")  # fmt: skip


def _blake3() -> Callable[[], Any] | None:
    try:
        module = importlib.import_module("blake3")
    except ImportError:
        return None
    factory: Callable[[], Any] = module.blake3
    return factory


HASHERS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}
if (_b3 := _blake3()) is not None:
    HASHERS["blake3"] = _b3
# tool -> (algorithm, command for files, command for stdin), fastest first.
TOOLS: dict[str, tuple[str, str, str]] = {
    "xxh128sum": ("xxh3_128", "xxh128sum --", "xxh128sum"),
    "b3sum": ("blake3", "b3sum --", "b3sum"),
    "openssl": ("sha256", "openssl dgst -sha256 --", "openssl dgst -sha256"),
    "python3": ("sha256", "python3 -c " + shlex.quote(_PYTHON_FILES), "python3 -c " + shlex.quote(_PYTHON_STDIN)),
    "sha256sum": ("sha256", "sha256sum --", "sha256sum"),
}
# Hashes a file while it is being uploaded: `size` bytes as they land, then `go` on stdin (the upload closed);
# EOF instead (the upload failed) ends it without an answer. Python's hashlib is as fast as openssl's.
_PYTHON_FOLLOW = ("import hashlib,os,select,sys\np,n=sys.argv[1],int(sys.argv[2]);f=open(p,'rb',buffering=0)\n"
                  "h=hashlib.sha256();d=0;go=False\nwhile d<n:\n b=f.read(min(1<<22,n-d))\n if b:\n"
                  "  h.update(b);d+=len(b);continue\n if go:break\n if select.select([0],[],[],0.02)[0]:\n"
                  "  if sys.stdin.buffer.readline().strip()!=b'go':sys.exit(3)\n  go=True\n"
                  "if not go and sys.stdin.buffer.readline().strip()!=b'go':sys.exit(3)\n"
                  "print(h.hexdigest() if d==n==os.fstat(f.fileno()).st_size else '-')\n")  # fmt: skip
# From this size on, a far side with python3 hashes an upload while it lands instead of after it.
FOLLOW_BYTES = 32 << 20
# Digests started ahead at once per connection, so uploads in parallel leave sessions for other commands.
ARMED_MAX = 2
_HEX = {"sha256": 64, "xxh3_128": 32, "blake3": 64}
_PROBE = ("for t in " + " ".join(TOOLS) + '; do command -v "$t" >/dev/null 2>&1 && echo "$t"; done; exit 0')
_OPENSSL_LINE = re.compile(r"[A-Za-z0-9-]+\((.*)\)= ([0-9a-f]{64})")


class FarDigests:
    """Digests of far-side files on one connection; learns once whether the far side runs commands, and which."""

    def __init__(self, ssh: paramiko.Transport, timeout: float) -> None:
        self.ssh = ssh
        # Hashing a large file on the far side can take a while before the first byte comes back.
        self.timeout = max(timeout, 600.0)
        self.can_exec: bool | None = None
        self.refused = False  # the last command's channel was refused
        self.tools: list[str] | None = None  # usable tools, fastest first; [] means read back
        self._probe: threading.Thread | None = None
        self._lock = threading.Lock()
        self._armed = 0  # Armed channels open: each is a session, and sshd allows 10 per connection

    def start_probe(self) -> None:
        """Ask the far side for its tools now, while the SFTP session opens (an exec takes a while to start)."""
        self._probe = threading.Thread(target=self._probe_quietly, name="sftp-digest-probe", daemon=True)
        self._probe.start()

    def _probe_quietly(self) -> None:
        with contextlib.suppress(Exception):  # asked again, with errors reported, when the answer is needed
            self._tools()

    def _exec(self, command: str) -> str | None:
        """stdout of `command` on the far side (whatever its exit status: a tool exits 1 when one file of many
        is missing), or None when it could not run: no such tool, or the server does not run commands."""
        self.refused = False
        if self.can_exec is False:
            return None
        try:
            result = ssh_exec.run(self.ssh, command, timeout=self.timeout)
        except ssh_exec.ExecRefused:
            self.refused = True
            # Once a command ran, a refused channel is the server's limit on sessions (MaxSessions), for now.
            self.can_exec = self.can_exec or False
            return None
        self.can_exec = self.can_exec or result.status not in _NO_EXEC  # 127: no such tool, this time
        return result.stdout if result.status not in _NO_EXEC else None

    def _tools(self) -> list[str]:
        probe = self._probe
        if probe is not None and probe is not threading.current_thread():
            probe.join(timeout=self.timeout)
            self._probe = None
        if self.tools is None:
            output = self._exec(_PROBE)
            found = {line.strip() for line in (output or "").splitlines()}
            tools = [t for t in TOOLS if t in found and TOOLS[t][0] in HASHERS]
            # A shell whose probe said nothing may still run sha256sum, as spoold always asked for.
            self.tools = tools if tools or not self.can_exec else ["sha256sum"]
        return self.tools

    @property
    def algorithm(self) -> str:
        """The digest the far side computes fastest (sha256 when it is read back)."""
        tools = self._tools()
        return TOOLS[tools[0]][0] if tools else "sha256"

    def algorithm_for(self, known: Collection[str]) -> str:
        """The digest to ask the far side for: the fastest it has among `known` (digests already at hand, so
        nothing is hashed here while sending), else the fastest it has."""
        tools = self._tools()
        return next((TOOLS[t][0] for t in tools if TOOLS[t][0] in known), self.algorithm)

    def _drop(self, tool: str) -> None:
        if self.tools and tool in self.tools:
            self.tools.remove(tool)

    def arm(self, path: str, size: int, algorithm: str) -> Armed | None:
        """Start the far side's `algorithm` digest of `path` (`size` bytes once uploaded) now, to answer once
        told `go`. Its shell starts while the file is sent; with python3 and sha256 a large file is hashed as it
        lands."""
        tools = self._tools()
        tool = next((t for t in tools if TOOLS[t][0] == algorithm), None)
        with self._lock:
            if tool is None or not self.can_exec or self._armed >= ARMED_MAX:
                return None
            self._armed += 1
        # Without `go` (the upload failed, the channel closed) the far side exits without an answer.
        command = f'IFS= read -r go && [ "$go" = go ] && exec {TOOLS[tool][1]} {shlex.quote(path)}'
        if TOOLS[tool][0] == "sha256" and "python3" in tools and size >= FOLLOW_BYTES:
            tool = "python3"  # whose answer is read as python3's: one digest a line
            command = f"exec python3 -c {shlex.quote(_PYTHON_FOLLOW)} {shlex.quote(path)} {int(size)}"
        try:
            return Armed(self.ssh, tool, path, command, self.timeout, self._disarmed)
        except (paramiko.SSHException, OSError, EOFError):
            self._disarmed()
            return None  # asked the usual way after the upload

    def _disarmed(self) -> None:
        with self._lock:
            self._armed -= 1

    def of_files(self, client: paramiko.SFTPClient, paths: list[str], algorithm: str) -> dict[str, str]:
        hashed: dict[str, str] = {}
        used = None
        for tool in list(self._tools()):
            if TOOLS[tool][0] != algorithm:
                continue
            output = self._exec(TOOLS[tool][1] + " " + " ".join(shlex.quote(p) for p in paths))
            hashed = _parse(tool, output or "", paths, _HEX[algorithm])
            if hashed or output is not None:
                used = tool
                break
            if not self.refused:
                self._drop(tool)  # no answer at all: the next tool, or reading back
        for path in paths:
            if path in hashed:
                continue
            digest = self._stdin(f"{TOOLS[used][2]} < {shlex.quote(path)}", algorithm) if used else None
            if digest is None and algorithm != "sha256":
                self._drop(used or "")  # sent again, and then hashed with the next tool
                raise ChecksumMismatch(f"{posixpath.basename(path)}: the far side gave no {algorithm} digest")
            hashed[path] = digest or read_back_sha256(client, path, None)
        return hashed

    def _stdin(self, command: str, algorithm: str) -> str | None:
        """The digest printed by `command`, a tool reading its standard input (so any file name works)."""
        match = re.search(rf"\b([0-9a-f]{{{_HEX[algorithm]}}})\b", self._exec(command) or "")
        return match.group(1) if match else None

    def of_prefix(self, client: paramiko.SFTPClient, path: str, length: int, algorithm: str) -> str | None:
        """The digest of the first `length` bytes of `path` (a partial upload to resume); None if unknown."""
        for tool in list(self._tools()):
            if TOOLS[tool][0] == algorithm:
                digest = self._stdin(f"head -c {int(length)} -- {shlex.quote(path)} | {TOOLS[tool][2]}", algorithm)
                if digest:
                    return digest
        return read_back_sha256(client, path, length) if algorithm == "sha256" else None

    def verify(
        self, client: paramiko.SFTPClient, expected: Mapping[str, str], where: str, algorithm: str,
        changed: Callable[[str], None] | None = None, armed: Armed | None = None,
    ) -> None:  # fmt: skip
        """Raise ChecksumMismatch (and remove the bad copies) unless every path hashes to its expected digest.

        `changed(path)` is called first for each bad path: it raises when the local source itself changed.
        """
        actual: dict[str, str] = {}
        if armed is not None and list(expected) == [armed.path] and TOOLS[armed.tool][0] == algorithm:
            # Read as the tool prints it: openssl's `SHA2-256(path)= digest` too, which was asked again before.
            answer = _parse(armed.tool, armed.fire() or "", [armed.path], _HEX[algorithm])
            if answer.get(armed.path) == expected[armed.path]:
                actual = answer
            # else hashed again the usual way: the far side read too early (a server writing out of order)
        actual = actual or self.of_files(client, list(expected), algorithm)
        bad = [path for path, digest in expected.items() if actual.get(path) != digest]
        for path in bad:
            with contextlib.suppress(OSError):
                client.remove(path)
        if bad and changed is not None:
            for path in bad:
                changed(path)
        if bad:
            raise ChecksumMismatch(f"{len(bad)} file(s) at {where} do not hash to what was sent "
                                   f"(first: {posixpath.basename(bad[0])}); they will be sent again")  # fmt: skip


class Armed:
    """A far-side digest command of one file, started ahead: it waits for `go` on its stdin, then hashes."""

    def __init__(self, ssh: paramiko.Transport, tool: str, path: str, command: str, timeout: float,
                 closed: Callable[[], None]) -> None:  # fmt: skip
        self.tool, self.path, self.timeout = tool, path, timeout
        self._closed: Callable[[], None] | None = closed
        self.channel = ssh.open_session(timeout=min(timeout, 60.0))
        try:
            self.channel.exec_command(command)
        except BaseException:
            self.channel.close()
            raise

    def fire(self) -> str | None:
        """The command's stdout once it ran to a clean exit, else None."""
        channel, out = self.channel, bytearray()
        channel.settimeout(self.timeout)
        try:
            channel.sendall(b"go\n")
            channel.shutdown_write()
        except OSError:
            return None  # it ended early (no such tool after all): asked again the usual way
        deadline = time.monotonic() + self.timeout
        while (data := channel.recv(65536)) and time.monotonic() < deadline:
            out += data[: max(0, ssh_exec.OUTPUT_LIMIT_BYTES - len(out))]
            while channel.recv_stderr_ready():
                channel.recv_stderr(65536)
        status = channel.recv_exit_status() if not data else -1
        self.close()
        return out.decode(errors="replace") if status == 0 else None

    def close(self) -> None:
        self.channel.close()
        closed, self._closed = self._closed, None
        if closed is not None:
            closed()


def _parse(tool: str, output: str, paths: list[str], width: int) -> dict[str, str]:
    """path -> digest from a tool's output; names it printed escaped or oddly are left out (read back)."""
    lines = output.splitlines()
    hashed: dict[str, str] = {}
    if tool == "python3":  # one line per path, in order
        if len(lines) == len(paths):
            hashed = {p: d for p, d in zip(paths, lines, strict=True) if re.fullmatch(f"[0-9a-f]{{{width}}}", d)}
        return hashed
    wanted = set(paths)
    for line in lines:
        if tool == "openssl":
            match = _OPENSSL_LINE.fullmatch(line)
            digest, name = (match.group(2), match.group(1)) if match else ("", "")
        else:
            digest, _, name = line.partition("  ")
        if name in wanted and re.fullmatch(f"[0-9a-f]{{{width}}}", digest):
            hashed[name] = digest
    return hashed
