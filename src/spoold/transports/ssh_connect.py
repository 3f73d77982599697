"""Opening one SSH connection for the sftp:// transport: TCP probe, host key check, authentication.

Imported only by `spoold.transports.sftp` (so only nodes that ship over SSH
import paramiko). Host keys are checked against the step's `known_hosts`; with
`host_key: tofu` the first key seen is recorded there and checked from then on.
An unknown or changed key is a permanent failure naming the host and the
fingerprint seen, before anything is sent. Never AutoAddPolicy.

A step without `known_hosts:` trusts `/etc/spoold/known_hosts` (root's to
write), and with `tofu` also records into `known_hosts` in the daemon's state
folder (`$STATE_DIRECTORY`, which systemd's `StateDirectory=spoold` sets; else
`/var/lib/spoold` for root, or `$XDG_STATE_HOME/spoold`, `~/.local/state/spoold`
for a user running spoold by hand). `~/.ssh/known_hosts` and the system's
OpenSSH files are never read: the daemon user's home may be the spool itself.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import getpass
import hashlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paramiko

from spoold.errors import PermanentError, TransientError
from spoold.redact import register_secret
from spoold.transports.base import ParsedUrl, credential_path

log = logging.getLogger("spoold.sftp")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# aes128-gcm costs the least CPU per byte with AES-NI, and paramiko's ctr mode is close behind.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com", "aes256-ctr")
KEEPALIVE_SECONDS = 15
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
SYSTEM_KNOWN_HOSTS = Path("/etc/spoold/known_hosts")
# Names another file for SYSTEM_KNOWN_HOSTS (tests, unusual installs); set by whoever starts the daemon.
KNOWN_HOSTS_ENV = "SPOOLD_KNOWN_HOSTS"
TOFU_FILE = "known_hosts"
KNOWN_HOSTS_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class KnownHosts:
    """The keys trusted for one host, the files they were read from, and where a first key is recorded."""

    keys: Mapping[str, paramiko.PKey]
    read_from: tuple[Path, ...]
    record_in: Path | None  # only with host_key: tofu
    is_state_file: bool  # record_in is the daemon's own file in its state folder

    def describe(self) -> str:
        return " or ".join(str(p) for p in self.read_from)


def system_known_hosts() -> Path:
    return Path(os.environ.get(KNOWN_HOSTS_ENV) or SYSTEM_KNOWN_HOSTS)


def state_directory() -> Path:
    """The daemon's own folder for what it learns while running (host keys trusted on first use)."""
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]  # systemd lists one folder per StateDirectory=
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return Path("/var/lib/spoold")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state") / "spoold"


def connect(url: ParsedUrl, settings: Mapping[str, Any], window_bytes: int, packet_bytes: int) -> paramiko.Transport:
    """An authenticated SSH connection to `url`'s host, whose host key was checked."""
    host, port = url.host, url.port or 22
    timeout = float(settings.get("connect_timeout") or 30)
    sock = probe(host, port, timeout)
    ssh = paramiko.Transport(sock, default_window_size=window_bytes, default_max_packet_size=packet_bytes)
    try:
        options = ssh.get_security_options()
        options.ciphers = tuple(c for c in FAST_CIPHERS if c in options.ciphers) + tuple(
            c for c in options.ciphers if c not in FAST_CIPHERS
        )
        known = known_hosts(host, port, settings)
        if known.keys:
            # Ask for a key type we know, so a host with several keys is not reported as changed.
            options.key_types = tuple(k for k in options.key_types if k in known.keys) + tuple(
                k for k in options.key_types if k not in known.keys
            )
        ssh.start_client(timeout=timeout)
        check_host_key(ssh.get_remote_server_key(), host, port, known)
        authenticate(ssh, url.user or getpass.getuser(), host, settings)
        ssh.set_keepalive(KEEPALIVE_SECONDS)
    except BaseException:
        ssh.close()
        raise
    return ssh


def probe(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to `host:port`, retried until `timeout`: cloud hosts report ready before sshd is."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(timeout, 10.0))
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise TransientError(f"cannot reach {host}:{port} within {timeout:g}s: "
                                     f"{exc.strerror or exc}") from None  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint as `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts(host: str, port: int, settings: Mapping[str, Any]) -> KnownHosts:
    """What a step trusts for `host:port`: its own `known_hosts`, else the daemon's files (never ~/.ssh)."""
    is_tofu = settings.get("host_key") == "tofu"
    keys = paramiko.HostKeys()
    if settings.get("known_hosts"):
        path = Path(settings["known_hosts"]).expanduser()
        if path.exists():
            try:
                keys.load(str(path))
            except (OSError, paramiko.SSHException, UnicodeDecodeError) as exc:
                raise PermanentError(f"cannot read known_hosts {path}: {exc}") from None
        read_from: tuple[Path, ...] = (path,)
        record_in, is_state_file = (path if is_tofu else None), False
    else:
        system = system_known_hosts()
        read_from, record_in, is_state_file = (system,), None, False
        if is_tofu:
            record_in, is_state_file = state_directory() / TOFU_FILE, True
            read_from = (system, record_in)
            _load_daemon_file(keys, record_in, follow=False)
        # Loaded last, so root's word replaces a key recorded on first use.
        _load_daemon_file(keys, system, follow=True)
    found = keys.lookup(_host_entry(host, port))
    return KnownHosts(dict(found) if found else {}, read_from, record_in, is_state_file)


def _load_daemon_file(keys: paramiko.HostKeys, path: Path, *, follow: bool) -> None:
    """Add the keys of a known_hosts file that only root or the daemon can have written; missing is empty."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PermanentError(f"cannot read known_hosts {path}: {exc.strerror}") from None
    try:
        _check_private(os.fstat(fd), path)
        data = os.read(fd, KNOWN_HOSTS_BYTES)
    finally:
        os.close(fd)
    for number, text in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except paramiko.SSHException:
            continue
        if entry is not None and entry.key is not None:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)


def _check_private(info: os.stat_result, path: Path) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise PermanentError(f"{path} is not a regular file; refusing to trust it as known_hosts")
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
        raise PermanentError(f"refusing to trust {path}: it belongs to uid {info.st_uid} with mode "
                             f"{stat.S_IMODE(info.st_mode):o}; only root or spoold's user may write it")  # fmt: skip


def check_host_key(key: paramiko.PKey, host: str, port: int, known: KnownHosts) -> None:
    entry = _host_entry(host, port)
    seen = f"{key.get_name()} {fingerprint(key)}"
    if key.get_name() in known.keys:
        if known.keys[key.get_name()] == key:
            return
        raise PermanentError(f"host key of {entry} CHANGED: it offered {seen}, which does not match "
                             f"{known.describe()}; refusing to connect (fix known_hosts if the host was "
                             "reinstalled)")  # fmt: skip
    if known.keys:
        raise PermanentError(f"host key of {entry} CHANGED: it offered {seen}, while {known.describe()} lists "
                             f"only {', '.join(sorted(known.keys))} for it; refusing to connect")  # fmt: skip
    if known.record_in is not None:
        line = f"{entry} {key.get_name()} {key.get_base64()}\n"
        if known.is_state_file:
            _record_in_state_file(known.record_in, line)
        else:
            known.record_in.parent.mkdir(parents=True, exist_ok=True)
            with open(known.record_in, "a", encoding="utf-8") as stream:
                stream.write(line)
        log.warning("trusting %s on first use: %s, recorded in %s", entry, seen, known.record_in)
        return
    raise PermanentError(f"unknown host key for {entry}: it offered {seen}, which is not in {known.describe()} "
                         "(spoold never reads ~/.ssh/known_hosts); add it there (ssh-keyscan, after checking "
                         "the fingerprint), name a file with known_hosts:, or set host_key: tofu")  # fmt: skip


def _record_in_state_file(path: Path, line: str) -> None:
    """Append to the daemon's own known_hosts: mode 0600 in a 0700 folder it owns, never through a link."""
    folder = path.parent
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PermanentError(f"cannot record the host key in {path}: {exc.strerror}") from None
    try:
        info = os.fstat(dir_fd)
        if info.st_uid != os.geteuid():
            raise PermanentError(f"cannot record the host key in {path}: {folder} belongs to uid {info.st_uid}")
        if info.st_mode & 0o077:
            os.fchmod(dir_fd, 0o700)  # systemd makes a StateDirectory= 0755 unless told otherwise
        try:
            fd = os.open(path.name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            fd = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)  # fmt: skip
        try:
            info = os.fstat(fd)
            _check_private(info, path)
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise PermanentError(f"cannot record the host key in {path}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)


def authenticate(ssh: paramiko.Transport, user: str, host: str, settings: Mapping[str, Any]) -> None:
    keys, password = _credentials(settings)
    refusal = "no identity, password_file or credential was given and no default key exists"
    is_refused = False
    for key in keys:
        try:
            ssh.auth_publickey(user, key)
            return
        except paramiko.AuthenticationException as exc:
            _raise_if_link_lost(ssh, user, host, exc, is_refused=is_refused)
            refusal, is_refused = f"key {fingerprint(key)} refused: {exc}", True
    if password is not None:
        try:
            ssh.auth_password(user, password)
            return
        except paramiko.AuthenticationException as exc:
            _raise_if_link_lost(ssh, user, host, exc, is_refused=is_refused)
            refusal = f"password refused: {exc}"
    raise PermanentError(f"authentication as {user}@{host} failed: {refusal}")


def _raise_if_link_lost(ssh: paramiko.Transport, user: str, host: str, exc: Exception, *, is_refused: bool) -> None:
    """A link cut during authentication is not a refusal: paramiko reports both as AuthenticationException.

    After a refusal, a closed link is the server's answer to it (sshd's MaxAuthTries), so it stays permanent.
    """
    if not is_refused and not ssh.is_active():
        raise TransientError(f"the connection to {user}@{host} was lost during authentication: {exc}") from None


def _credentials(settings: Mapping[str, Any]) -> tuple[list[paramiko.PKey], str | None]:
    keys: list[paramiko.PKey] = []
    password: str | None = None
    if settings.get("identity"):
        keys.append(_load_key(Path(settings["identity"]).expanduser()))
    if settings.get("password_file"):
        password = _read_secret(Path(settings["password_file"]).expanduser())
    if settings.get("credential"):
        path = credential_path(str(settings["credential"]))
        text = _read_secret(path)
        if "PRIVATE KEY-----" in text:
            keys.append(_load_key(path))
        else:
            password = text
    if not keys and password is None:
        home = Path("~/.ssh").expanduser()
        keys = [_load_key(home / n) for n in DEFAULT_IDENTITIES if (home / n).exists()]
    return keys, password


def _load_key(path: Path) -> paramiko.PKey:
    try:
        key: paramiko.PKey = paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise PermanentError(f"identity {path} does not exist") from None
    except paramiko.PasswordRequiredException:
        raise PermanentError(f"identity {path} is encrypted; spoold needs a key without a passphrase") from None
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise PermanentError(f"cannot read identity {path}: {exc}") from None
    return key


def _read_secret(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise PermanentError(f"cannot read secret file {path}: {exc.strerror}") from None
    register_secret(text)
    return text


class SendingSFTPClient(paramiko.SFTPClient):  # type: ignore[misc]
    """paramiko's SFTP client, sending a request without copying its unsent rest again after each channel send.

    paramiko's own `_write_all` slices the bytes still to send after every `Channel.send`, which takes at most
    one SSH packet (32 KiB to OpenSSH), so each 255 KiB write request was copied about 3.5 times over. A
    memoryview's slices copy nothing. If a paramiko ever stops calling `_write_all`, its own way runs instead.
    """

    def _write_all(self, out: bytes) -> None:
        rest = memoryview(out)
        while rest:
            sent = self.sock.send(rest)
            if sent <= 0:
                raise EOFError()
            rest = rest[sent:]


def open_sftp(ssh: paramiko.Transport, window_bytes: int, packet_bytes: int, timeout: float) -> paramiko.SFTPClient:
    """An SFTP session on `ssh` within `timeout`, else TimeoutError.

    paramiko waits for the subsystem's reply without a timeout, so a wedged connection (a blackholed link
    with its TCP connection still open) would hold the step for ever.
    """
    try:
        channel = ssh.open_session(window_size=window_bytes, max_packet_size=packet_bytes, timeout=timeout)
    except paramiko.SSHException as exc:
        if "timeout" in str(exc).lower():
            raise TimeoutError(str(exc)) from None
        raise
    timer = threading.Timer(timeout, channel.close)
    timer.start()
    try:
        channel.invoke_subsystem("sftp")
    except paramiko.SSHException:
        if not timer.is_alive():
            raise TimeoutError("the SFTP subsystem did not answer") from None
        raise
    finally:
        timer.cancel()
    channel.settimeout(timeout)
    return SendingSFTPClient(channel)
