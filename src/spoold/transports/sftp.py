"""sftp:// — another node over SSH (paramiko), one connection per destination, reused across items.

Uploads go to `.<name>.spoold.part` beside the target, resume from the remote
size once the remote prefix hashes like the local one (a corrupted partial is
re-sent, unlike `sftp reput`), are hashed while sent (`sftp_upload`), verified on
the far side with the fastest digest tool it has, probed once per connection
(`sftp_digest`; a large file is hashed there while it lands), else by reading
back, and then renamed into place with `posix-rename`. Host keys are checked
against `known_hosts`, or recorded on first use with `host_key: tofu`; never
accepted silently.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import paramiko

from spoold.errors import CommandTimedOut, PermanentError, SpooldError, TransientError
from spoold.transports import ssh_exec
from spoold.transports.base import (
    CONNECTION_KEYS,
    CommandResult,
    Delivered,
    RemoteEntry,
    TransferContext,
    Transport,
    TreeLimits,
    check_component,
    join_remote,
)
from spoold.transports.landing import Landing
from spoold.transports.local import part_name
from spoold.transports.sftp_digest import Armed, FarDigests
from spoold.transports.sftp_tree import (
    entry,
    fetch,
    has_magic,
    list_tree,
    local_tree,
    makedirs,
    match,
    pull_listing,
    rmtree,
)
from spoold.transports.sftp_upload import send, unchanged
from spoold.transports.ssh_connect import connect, open_sftp

log = logging.getLogger("spoold.sftp")
# paramiko logs every connection and authentication at INFO; the daemon's log keeps only its problems.
logging.getLogger("paramiko").setLevel(logging.WARNING)

PART_SUFFIX = ".spoold.part"
WINDOW_BYTES = 64 << 20
PACKET_BYTES = 32 << 10
VERIFY_BATCH = 200


def temp_name(target: str) -> str:
    folder, name = posixpath.split(target.rstrip("/"))
    return posixpath.join(folder, f".{name}{PART_SUFFIX}")


class SftpTransport(Transport):
    def __init__(self, url: Any, settings: Mapping[str, Any]) -> None:
        super().__init__(url, settings)
        self._lock = threading.Lock()
        self._ssh: paramiko.Transport | None = None
        self._local = threading.local()
        self._digests: FarDigests | None = None
        self._io_timeout = max(float(settings.get("connect_timeout") or 30), 30.0)

    # -- connection -------------------------------------------------------------------------------

    def is_usable(self) -> bool:
        return self._ssh is None or self._ssh.is_active()

    def close(self) -> None:
        with self._lock:
            ssh, self._ssh = self._ssh, None
        if ssh is not None:
            ssh.close()

    def _connection(self) -> paramiko.Transport:
        """The shared SSH connection; reconnects when it died."""
        with self._lock:
            if self._ssh is None or not self._ssh.is_active():
                with self._mapped(f"connect to {self.url.host}"):
                    self._ssh = connect(self.url, self.settings, WINDOW_BYTES, PACKET_BYTES)
                self._digests = FarDigests(self._ssh, self._io_timeout)
                self._digests.start_probe()
            return self._ssh

    def _client(self) -> paramiko.SFTPClient:
        """This thread's SFTP session on the shared SSH connection."""
        ssh = self._connection()
        client: paramiko.SFTPClient | None = getattr(self._local, "client", None)
        if client is None or client.get_channel().get_transport() is not ssh or client.get_channel().closed:
            with self._mapped(f"open an SFTP session on {self.url.host}"):
                client = open_sftp(ssh, WINDOW_BYTES, PACKET_BYTES, self._io_timeout)
            self._local.client = client
        return client

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """paramiko, socket and SFTP status errors -> spoold's classes, at the boundary."""
        try:
            yield
        except SpooldError:
            raise
        except paramiko.AuthenticationException as exc:
            raise PermanentError(f"{what}: authentication refused: {exc}") from None
        except TimeoutError:
            # The link may be blackholed with the TCP connection still open: paramiko would go on calling it
            # active, and every later attempt would wait on the same wedged connection. Never reuse it.
            self._local.client = None
            self.close()
            raise TransientError(f"{what}: timed out") from None
        except (paramiko.SSHException, EOFError) as exc:
            self._drop()
            raise TransientError(f"{what}: connection lost: {exc or type(exc).__name__}") from None
        except paramiko.SFTPError as exc:
            # The server broke the SFTP protocol (a reply of the wrong kind): maybe a glitch, so tried again.
            self._forget_client()
            raise TransientError(f"{what}: the server sent a bad SFTP reply: {exc}") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermanentError(f"{what}: permission denied") from None
            if exc.errno == errno.ENOENT:
                raise PermanentError(f"{what}: no such file or folder ({exc.filename or reason})") from None
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TransientError(f"{what}: no space left: {reason}") from None
            # Resets, refused connections and SFTP's bare "Failure" (how sftp-server reports a full disk).
            raise TransientError(f"{what}: {reason}") from None

    def _drop(self) -> None:
        if self._ssh is not None and not self._ssh.is_active():
            self._local.client = None

    # -- upload -----------------------------------------------------------------------------------

    def put_file(self, source: Path, target: str, digests: Mapping[str, str], ctx: TransferContext) -> Delivered:
        client = self._client()
        tmp = temp_name(target)
        with self._mapped(f"upload to {self.url.host}:{target}"):
            makedirs(client, posixpath.dirname(target))
            armed: list[Armed | None] = []  # the far digest, started once the upload has opened the file
            length = source.stat().st_size
            try:
                size, (algorithm, expected), is_hashed = self._send(
                    client, source, tmp, ctx, 0, digests,
                    lambda algorithm: armed.append(self._far_digests().arm(tmp, length, algorithm)))  # fmt: skip
                self._far_digests().verify(client, {tmp: expected}, f"{self.url.host}:{target}", algorithm,
                                           None if is_hashed else lambda _p: unchanged(source, algorithm, expected),
                                           armed[0] if armed else None)  # fmt: skip
            finally:
                for started in armed:
                    if started is not None:
                        started.close()
            client.posix_rename(tmp, target)
        return Delivered(target, size, is_verified=True)

    def put_tree(self, source: Path, target: str, digests: Mapping[str, Mapping[str, str]],
                 ctx: TransferContext) -> Delivered:  # fmt: skip
        client = self._client()
        final = target.rstrip("/")
        tmp = temp_name(final)
        verified: list[str] = ctx.checkpoint.setdefault("verified", [])
        done_set = set(verified)
        total = 0
        with self._mapped(f"upload to {self.url.host}:{final}"):
            if verified and self.stat(tmp) is None:
                verified.clear()  # the partial folder is gone on the far side: everything goes again
                done_set.clear()
            makedirs(client, tmp)
            pending: dict[str, tuple[str, str]] = {}  # remote -> (algorithm, digest)
            sources: dict[str, Path] = {}  # files whose far digest is compared with the checksum step's only
            for relative, path in local_tree(source):
                remote = join_remote(tmp, relative)
                if path is None:
                    makedirs(client, remote)
                    continue
                if relative in done_set:
                    total += path.stat().st_size
                    continue
                ctx.check_stop()
                makedirs(client, posixpath.dirname(remote))
                size, expected, is_hashed = self._send(client, path, remote, ctx, total, digests.get(relative, {}))
                total += size
                pending[remote] = expected
                if not is_hashed:
                    sources[remote] = path
                if len(pending) >= VERIFY_BATCH:
                    self._verify_batch(client, pending, sources, tmp, verified, ctx)
            self._verify_batch(client, pending, sources, tmp, verified, ctx)
            if self.stat(final) is not None:
                # An earlier delivery of the same item (a re-run after a crash) is replaced whole.
                rmtree(client, final)
            client.posix_rename(tmp, final)
        return Delivered(final, total, is_verified=True)

    def _verify_batch(
        self, client: paramiko.SFTPClient, pending: dict[str, tuple[str, str]], sources: dict[str, Path], tmp: str,
        verified: list[str], ctx: TransferContext,
    ) -> None:  # fmt: skip
        if not pending:
            return

        def changed(remote: str) -> None:
            if remote in sources:
                unchanged(sources[remote], *pending[remote])

        for algorithm in sorted({a for a, _ in pending.values()}):  # one, unless a far tool failed meanwhile
            expected = {remote: digest for remote, (a, digest) in pending.items() if a == algorithm}
            self._far_digests().verify(client, expected, f"{self.url.host}:{tmp}", algorithm, changed)
        verified.extend(posixpath.relpath(p, tmp) for p in pending)
        pending.clear()
        sources.clear()
        ctx.save_checkpoint()

    def write_small(self, target: str, data: bytes) -> None:
        client = self._client()
        tmp = temp_name(target)
        with self._mapped(f"write {self.url.host}:{target}"):
            makedirs(client, posixpath.dirname(target))
            with client.open(tmp, "wb") as stream:
                stream.write(data)
            client.posix_rename(tmp, target)

    def _send(
        self, client: paramiko.SFTPClient, source: Path, remote: str, ctx: TransferContext, base: int,
        given: Mapping[str, str], opened: Callable[[str], None] | None = None,
    ) -> tuple[int, tuple[str, str], bool]:  # fmt: skip
        """(size, (algorithm, the digest the far side must show), whether it was hashed here)."""
        digests = self._far_digests()
        return send(client, source, remote, ctx, base, given=given, digests=digests, timeout=self._io_timeout,
                    opened=opened)  # fmt: skip

    def _far_digests(self) -> FarDigests:
        assert self._digests is not None, "connected by _client() first"
        return self._digests

    def run_command(self, command: str, *, timeout: float, check_stop: Callable[[], None]) -> CommandResult:
        ssh = self._connection()  # an exec channel needs no SFTP session
        with self._mapped(f"run a command on {self.url.host}"):
            try:
                return ssh_exec.run(ssh, command, timeout=timeout, check_stop=check_stop)
            except ssh_exec.ExecRefused as exc:
                raise PermanentError(f"{self.url.host} does not run commands for this account: {exc}") from None
            except CommandTimedOut:
                self.close()  # a link gone silent would wedge every later command on it
                raise

    @classmethod
    def connection_key(cls, settings: Mapping[str, Any]) -> str:
        # ship, wait, pull and exec add options of their own; only these decide the SSH connection.
        return repr(sorted((k, settings.get(k)) for k in CONNECTION_KEYS))

    def stat(self, target: str) -> RemoteEntry | None:
        client = self._client()
        with self._mapped(f"stat {self.url.host}:{target}"):
            try:
                attrs = client.stat(target)
            except FileNotFoundError:
                return None
        return entry(target, attrs)

    def glob(self, pattern: str) -> list[RemoteEntry]:
        parts = pattern.split("/")
        first = next((i for i, p in enumerate(parts) if has_magic(p)), None)
        if first is None:
            entry = self.stat(pattern)
            return [entry] if entry else []
        client = self._client()
        with self._mapped(f"list {self.url.host}:{pattern}"):
            return match(client, "/".join(parts[:first]) or "/", parts[first:], [0])

    def tree(self, target: str) -> list[RemoteEntry]:
        with self._mapped(f"list {self.url.host}:{target}"):
            return list_tree(self._client(), target.rstrip("/") or "/", TreeLimits())

    def read_bytes(self, target: str, limit: int = 1 << 20) -> bytes:
        client = self._client()
        with self._mapped(f"read {self.url.host}:{target}"), client.open(target, "rb") as stream:
            data: bytes = stream.read(limit)
        return data

    def get_tree(self, source: str, target: Path, ctx: TransferContext, *, name: str | None = None,
                 limits: TreeLimits | None = None) -> list[Path]:  # fmt: skip
        """Download a remote file or folder into `target` as `name` (default: its own), through a `Landing`.

        The root is the step's own path, so a link there is followed; below it the server's listing is
        checked whole first (`walk`) and nothing in it is followed. Partial files are continued on a re-run.
        """
        client = self._client()
        origin = source.rstrip("/") or "/"
        name = check_component(posixpath.basename(origin) if name is None else name, f"pull from {origin}")
        tmp = part_name(name, PART_SUFFIX)
        with self._mapped(f"download {self.url.host}:{origin}"):
            try:
                is_tree, files = pull_listing(client, origin, f"{self.url.host}:{origin}", limits or TreeLimits())
            except BaseException:
                self._forget_client()  # a listing left half read must not confuse the next request
                raise
            total, done = sum(s for _, s in files if s >= 0), 0

            def report(n: int) -> None:
                ctx.progress(done + n, total)  # `done` as it is when called: the bytes of the files before this one

            with Landing(target) as landing:
                landing.check_replaceable(name, is_tree)  # before the download, which may be long; again at publish
                if is_tree:
                    landing.makedirs([tmp])
                for relative, size in files:
                    parts = [tmp, *relative.split("/")] if relative else [tmp]
                    if size < 0:
                        landing.makedirs(parts)
                        continue
                    ctx.check_stop()
                    remote = join_remote(origin, relative) if relative else origin
                    writer, offset = landing.open_file(parts)
                    with writer:
                        fetch(client, remote, writer, offset, size, report, ctx)
                    done += size
                final = landing.publish(tmp, name)
        return [final]

    def _forget_client(self) -> None:
        client: paramiko.SFTPClient | None = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
