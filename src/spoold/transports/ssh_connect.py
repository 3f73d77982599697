"""Opening one SSH connection for the sftp:// transport: TCP probe, host key check, authentication.

Imported only by `spoold.transports.sftp` (so only nodes that ship over SSH
import paramiko). Host keys are checked against `known_hosts`; with
`host_key: tofu` the first key seen is recorded there and checked from then on.
An unknown or changed key is a permanent failure naming the host and the
fingerprint seen, before anything is sent. Never AutoAddPolicy.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paramiko

from spoold.errors import PermanentError, TransientError
from spoold.redact import register_secret
from spoold.transports.base import ParsedUrl, credential_path

log = logging.getLogger("spoold.sftp")

# aes128-gcm costs the least CPU per byte with AES-NI, and paramiko's ctr mode is close behind.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes128-ctr", "aes256-gcm@openssh.com", "aes256-ctr")
KEEPALIVE_SECONDS = 15
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


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
        known, known_hosts = _known_keys(host, port, settings)
        if known:
            # Ask for a key type we know, so a host with several keys is not reported as changed.
            options.key_types = tuple(k for k in options.key_types if k in known) + tuple(
                k for k in options.key_types if k not in known
            )
        ssh.start_client(timeout=timeout)
        check_host_key(ssh.get_remote_server_key(), host, port, known, known_hosts, settings.get("host_key"))
        _authenticate(ssh, url.user or getpass.getuser(), host, settings)
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


def _known_keys(host: str, port: int, settings: Mapping[str, Any]) -> tuple[dict[str, paramiko.PKey], Path]:
    path = Path(settings.get("known_hosts") or "~/.ssh/known_hosts").expanduser()
    keys = paramiko.HostKeys()
    if path.exists():
        try:
            keys.load(str(path))
        except (OSError, paramiko.SSHException) as exc:
            raise PermanentError(f"cannot read known_hosts {path}: {exc}") from None
    found = keys.lookup(_host_entry(host, port))
    return (dict(found) if found else {}), path


def check_host_key(
    key: paramiko.PKey, host: str, port: int, known: Mapping[str, paramiko.PKey], path: Path, mode: str | None
) -> None:
    entry = _host_entry(host, port)
    seen = f"{key.get_name()} {fingerprint(key)}"
    if key.get_name() in known:
        if known[key.get_name()] == key:
            return
        raise PermanentError(f"host key of {entry} CHANGED: it offered {seen}, which does not match {path}; "
                             "refusing to connect (fix known_hosts if the host was reinstalled)")  # fmt: skip
    if known:
        raise PermanentError(f"host key of {entry} CHANGED: it offered {seen}, while {path} lists only "
                             f"{', '.join(sorted(known))} for it; refusing to connect")  # fmt: skip
    if mode == "tofu":
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(f"{entry} {key.get_name()} {key.get_base64()}\n")
        log.warning("trusting %s on first use: %s, recorded in %s", entry, seen, path)
        return
    raise PermanentError(f"unknown host key for {entry}: it offered {seen}, which is not in {path}; add it "
                         "(ssh-keyscan, after checking the fingerprint) or set host_key: tofu")  # fmt: skip


def _authenticate(ssh: paramiko.Transport, user: str, host: str, settings: Mapping[str, Any]) -> None:
    keys, password = _credentials(settings)
    refusal = "no identity, password_file or credential was given and no default key exists"
    for key in keys:
        try:
            ssh.auth_publickey(user, key)
            return
        except paramiko.AuthenticationException as exc:
            refusal = f"key {fingerprint(key)} refused: {exc}"
    if password is not None:
        try:
            ssh.auth_password(user, password)
            return
        except paramiko.AuthenticationException as exc:
            refusal = f"password refused: {exc}"
    raise PermanentError(f"authentication as {user}@{host} failed: {refusal}")


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
