"""The command line. Only this module prints to the terminal and chooses exit codes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import Any

from spoold import __version__
from spoold.daemon.config import EMBEDDED_DEFAULT, Config, load_config
from spoold.daemon.layout import SpoolLayout
from spoold.daemon.retries import requeue_failed
from spoold.errors import ConfigError
from spoold.fsio import read_json

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_NOINPUT = 66
EX_CANTCREAT = 73
EX_CONFIG = 78
# health.json is a few hundred bytes; a bigger one is not the daemon's.
HEALTH_BYTES = 1 << 20

log = logging.getLogger("spoold.cli")


class CliError(Exception):
    def __init__(self, message: str, code: int = EX_FAIL) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spoold", description="Spool-directory daemon: watch inboxes, run chains.")
    parser.add_argument("--version", action="version", version=f"spoold {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", type=Path, help="config file (default /etc/spoold/spoold.yaml, "
                                                        "else the embedded default)")  # fmt: skip
        return p

    with_config(commands.add_parser("run", help="run in the foreground (systemd runs this)"))
    with_config(commands.add_parser("check", help="validate the config; exit 78 on error"))
    status = with_config(commands.add_parser("status", help="show queues and items"))
    status.add_argument("queue", nargs="?", help="only this queue")
    status.add_argument("item", nargs="?", help="only this item")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", action="store_true", help="redraw every second")
    status.add_argument("--all", action="store_true", help="list done items too")
    retry = with_config(commands.add_parser("retry", help="send failed items back to be processed"))
    retry.add_argument("queue")
    retry.add_argument("item", nargs="?")
    retry.add_argument("--all", action="store_true", help="every failed item of the queue")
    init = commands.add_parser("init", help="create the spool layout and a starter config")
    init.add_argument("spool", nargs="?", default="./spool", type=Path)
    drop = with_config(commands.add_parser("drop", help="copy files or folders into an inbox safely"))
    drop.add_argument("queue")
    drop.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "check": cmd_check, "status": cmd_status, "retry": cmd_retry, "init": cmd_init,
               "drop": cmd_drop}[args.command]  # fmt: skip
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"spoold: config error: {exc.describe()}", file=sys.stderr)
        return EX_CONFIG
    except CliError as exc:
        print(f"spoold: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    steps = sum(len(q.steps) for q in config.queues.values())
    print(f"{config.source}: ok ({len(config.queues)} queues, {steps} steps, spool {config.spool})")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    from spoold.daemon.logs import setup_logging
    from spoold.daemon.server import Server

    config = load_config(args.config)
    setup_logging(config.log_level)
    daemon = Server(config, args.config)
    try:
        code = daemon.run()
    except PermissionError as exc:
        raise CliError(f"cannot use the spool {config.spool}: {exc.strerror}: {exc.filename}", EX_CANTCREAT) from None
    except OSError as exc:
        raise CliError(f"cannot run: {exc}", EX_CANTCREAT) from None
    if code != EX_OK:
        # A second stop request: leave now, without waiting for worker threads.
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from spoold import statusview

    # statusview escapes what items hold; a character the terminal's encoding lacks becomes an escape, not a crash.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    config = load_config(args.config)
    queues = _pick_queues(config, args.queue)
    if args.item:
        if "/" in args.item or args.item in (".", ".."):
            raise CliError(f"no item {statusview.shown(args.item)!r}: an item name is one path component", EX_USAGE)
        path = config.spool / args.queue / "status" / f"{args.item}.json"

        def render_item() -> str:
            document = read_json(path)
            if document is None:
                raise CliError(f"no item {statusview.shown(args.item)!r} in queue {args.queue!r} "
                               f"({statusview.shown(path)} does not exist)", EX_NOINPUT)  # fmt: skip
            # ensure_ascii: control characters and surrogate-escaped bytes leave as \uXXXX, never raw.
            return json.dumps(document, indent=2, ensure_ascii=True) if args.json else statusview.render_item(document)

        if args.watch:
            statusview.watch(render_item)
        print(render_item())
        return EX_OK

    def render() -> str:
        data = statusview.summary(config.spool, queues)
        if args.json:
            return json.dumps(data, indent=2, ensure_ascii=True)
        return statusview.render_table(data, is_all=args.all or bool(args.queue))

    if args.watch:
        statusview.watch(render)
    print(render())
    return EX_OK


def _pick_queues(config: Config, queue: str | None) -> list[str]:
    if queue is None:
        return list(config.queues)
    if queue not in config.queues:
        raise CliError(f"no queue {queue!r} in {config.source}; queues: {', '.join(config.queues)}", EX_USAGE)
    return [queue]


def cmd_retry(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _pick_queues(config, args.queue)
    if bool(args.item) == bool(args.all):
        raise CliError("say which failed item to retry, or --all", EX_USAGE)
    folders = SpoolLayout(config.spool, config.queues).queues[args.queue]
    if args.item:
        names = [args.item]
    else:
        names = sorted(p.name for p in folders.failed.iterdir()) if folders.failed.is_dir() else []
    retried = 0
    for name in names:
        if not requeue_failed(folders, name):
            if args.item:
                raise CliError(f"{args.queue}/{name} is not a failed item", EX_NOINPUT)
            continue
        retried += 1
        print(f"{args.queue}/{name}: queued again")
    _nudge_daemon(config)
    if not retried:
        print(f"{args.queue}: no failed items")
    return EX_OK


def _nudge_daemon(config: Config) -> None:
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


def cmd_init(args: argparse.Namespace) -> int:
    spool: Path = args.spool
    config_path = spool / "spoold.yaml"
    text = EMBEDDED_DEFAULT.replace("spool: ./spool", f"spool: {spool.resolve()}").replace(
        "file://./spool/shipped/", f"file://{spool.resolve()}/shipped/"
    )
    from spoold.daemon.config import parse_config

    config = parse_config(text, str(config_path))
    try:
        SpoolLayout(config.spool, config.queues).ensure()
        if not config_path.exists():
            config_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot create {spool}: {exc.strerror}", EX_CANTCREAT) from None
    print(f"created {spool.resolve()} with queues {', '.join(config.queues)}")
    print(f"config: {config_path}  (run: spoold run -c {config_path})")
    return EX_OK


def cmd_drop(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _pick_queues(config, args.queue)
    queue = config.queues[args.queue]
    inbox = config.spool / args.queue / "inbox"
    if not inbox.is_dir():
        raise CliError(f"{inbox} does not exist; start spoold once (or run spoold init) to create it", EX_NOINPUT)
    for path in args.paths:
        if not path.exists() or path.is_symlink():
            raise CliError(f"{path}: no such file or folder (links are not followed)", EX_NOINPUT)
        if (inbox / path.name).exists():
            raise CliError(f"{inbox / path.name} already exists; not overwriting it", EX_CANTCREAT)
    for path in args.paths:
        _drop_one(path, inbox, is_marker_wanted=path.is_dir() and queue.spec.ready == "marker")
        print(f"dropped {path} into {args.queue}")
    return EX_OK


def _drop_one(path: Path, inbox: Path, *, is_marker_wanted: bool) -> None:
    # A hidden temp name is ignored by the daemon until the rename makes it whole at once.
    tmp = inbox / f".{path.name}.spoold-drop"
    try:
        if path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp, symlinks=True)
        else:
            shutil.copy2(path, tmp)
        os.rename(tmp, inbox / path.name)
        if is_marker_wanted:
            marker_tmp = inbox / f".{path.name}.ready.spoold-drop"
            marker_tmp.write_text("{}\n", encoding="utf-8")
            os.rename(marker_tmp, inbox / f"{path.name}.ready")
    except OSError as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise CliError(f"cannot drop {path}: {exc.strerror}", EX_CANTCREAT) from None
