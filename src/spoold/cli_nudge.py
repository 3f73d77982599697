"""`spoold retry` asks the spool's running daemon to look at work/ now: checking that it is the daemon first."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
from pathlib import Path
from typing import Any

from spoold.daemon.config import Config, load_config
from spoold.errors import ConfigError

# health.json is a few hundred bytes; a bigger one is not the daemon's.
HEALTH_BYTES = 1 << 20

log = logging.getLogger("spoold.cli")


def nudge_daemon(config: Config) -> None:
    """Ask the spool's running daemon to look at work/ now rather than at its next rescan.

    health.json names the pid, but `spoold retry` often runs as root, so a forged health.json must not make it
    signal another process: the pid is signalled only when health.json is the daemon's (owned by the spool
    root's owner or root, writable by no one else) and the process is that user's `spoold run` on this spool.
    Otherwise nothing is sent, quietly: the daemon finds the item at its next rescan anyway.
    """
    try:
        pid, pidfd = _open_spool_daemon(config)
    except _NotTheDaemon as exc:
        log.debug("not signalling the daemon: %s", exc)
        return
    try:
        if pidfd is None:
            os.kill(pid, signal.SIGUSR1)
        else:
            # Through the pidfd, so a daemon that exited after the checks is not replaced by a reused pid.
            signal.pidfd_send_signal(pidfd, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError) as exc:
        log.debug("not signalling the daemon: %s", exc)
    finally:
        if pidfd is not None:
            os.close(pidfd)


class _NotTheDaemon(Exception):
    """Raised when health.json's pid is not known to be this spool's daemon."""


def _open_spool_daemon(config: Config) -> tuple[int, int | None]:
    """The daemon's pid and a pidfd for it (None where the kernel has none), once it passed every check."""
    try:
        owners = {os.stat(config.spool).st_uid, 0}
        health = _read_daemon_json(config.spool / "health.json", owners)
    except (OSError, ValueError, RecursionError) as exc:
        raise _NotTheDaemon(f"health.json: {exc}") from None
    pid = health.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31 or pid == os.getpid():
        raise _NotTheDaemon(f"health.json names no usable pid ({pid!r})")
    fd = None
    with contextlib.suppress(AttributeError, OSError):
        fd = os.pidfd_open(pid)  # before the checks: whatever they read, the signal goes to this process
    try:
        _check_daemon_process(pid, owners, config)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return pid, fd


def _read_daemon_json(path: Path, owners: set[int]) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_uid not in owners:
            raise ValueError(f"owned by uid {info.st_uid}, not by the daemon's user")
        if info.st_mode & 0o022:
            raise ValueError(f"writable by others (mode {stat.S_IMODE(info.st_mode):o})")
        data = os.read(fd, HEALTH_BYTES)
    finally:
        os.close(fd)
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    return document


def _check_daemon_process(pid: int, owners: set[int], config: Config) -> None:
    proc = Path(f"/proc/{pid}")
    try:
        uids = {int(u) for line in (proc / "status").read_text().splitlines() if line.startswith("Uid:")
                for u in line.split()[1:]}  # fmt: skip
        argv = [os.fsdecode(a) for a in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
    except (OSError, ValueError) as exc:
        raise _NotTheDaemon(f"cannot inspect pid {pid}: {exc}") from None
    if not uids or not uids <= owners:
        raise _NotTheDaemon(f"pid {pid} runs as uid {sorted(uids)}, not as the spool's owner or root")
    run_at = _spoold_run_index(argv)
    if run_at is None:
        raise _NotTheDaemon(f"pid {pid} is not `spoold run`")
    if not _runs_this_spool(proc, argv[run_at + 1 :], config):
        raise _NotTheDaemon(f"pid {pid} runs another spool")


def _spoold_run_index(argv: list[str]) -> int | None:
    """Where `run` follows the program in `python -m spoold run`, `python /usr/bin/spoold run`, `spoold run`."""
    if not argv or not (Path(argv[0]).name.startswith("python") or Path(argv[0]).name == "spoold"):
        return None
    for index, word in enumerate(argv[:-1]):
        if Path(word).name == "spoold" and argv[index + 1] == "run":
            return index + 1
    return None


def _runs_this_spool(proc: Path, options: list[str], config: Config) -> bool:
    """False only when the process's config clearly names another spool; True when that cannot be told cheaply."""
    given: str | None = None
    for index, word in enumerate(options):
        if word in ("-c", "--config") and index + 1 < len(options):
            given = options[index + 1]
        elif word.startswith("--config="):
            given = word.partition("=")[2]
        elif word.startswith("-c") and len(word) > 2:
            given = word[2:]
    try:
        cwd = Path(os.readlink(proc / "cwd"))
    except OSError:
        return True
    path = cwd / given if given else None
    with contextlib.suppress(OSError):
        if path is not None and os.path.samefile(path, config.source):
            return True
    try:
        spool = cwd / load_config(path).spool
    except (ConfigError, OSError):
        return True
    try:
        return os.path.samefile(spool, config.spool)
    except OSError:
        return False
