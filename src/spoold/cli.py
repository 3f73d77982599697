"""The command line. Only the `cli` modules print to the terminal and choose exit codes (`cli_base`);
`cli_drop` is `spoold drop [--wait]`, `cli_nudge` the signal `spoold retry` sends the daemon."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from importlib import resources
from pathlib import Path

from spoold import __version__, cli_shared
from spoold.cli_base import EX_CANTCREAT, EX_CONFIG, EX_NOINPUT, EX_OK, EX_USAGE, CliError, pick_queues
from spoold.cli_drop import add_arguments as add_drop_arguments
from spoold.cli_drop import cmd_drop
from spoold.cli_nudge import nudge_daemon
from spoold.daemon.config import EMBEDDED_DEFAULT, load_config
from spoold.daemon.layout import SpoolLayout
from spoold.daemon.retries import requeue_failed
from spoold.errors import ConfigError
from spoold.fsio import read_json

# `spoold schema NAME`: the JSON Schemas (draft 2020-12) of the files spoold writes for others to read.
SCHEMAS = {"sidecar": "sidecar.schema.json", "health": "health.schema.json"}


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
    status.add_argument("--watch", action="store_true", help="redraw every second (with --json: one JSON "
                                                             "document per line, per refresh)")
    status.add_argument("--all", action="store_true", help="list done items too")
    retry = with_config(commands.add_parser("retry", help="send failed items back to be processed"))
    retry.add_argument("queue")
    retry.add_argument("item", nargs="?")
    retry.add_argument("--all", action="store_true", help="every failed item of the queue")
    init = commands.add_parser("init", help="create the spool layout and a starter config")
    init.add_argument("spool", nargs="?", default="./spool", type=Path)
    add_drop_arguments(with_config(commands.add_parser("drop", help="copy files or folders into an inbox safely")))
    schema = commands.add_parser("schema", help="print the JSON Schema of a sidecar or of health.json")
    schema.add_argument("name", metavar="NAME", help=f"one of: {', '.join(SCHEMAS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "check": cmd_check, "status": cmd_status, "retry": cmd_retry, "init": cmd_init,
               "drop": cmd_drop, "schema": cmd_schema}[args.command]  # fmt: skip
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
    queues = pick_queues(config, args.queue)
    # --watch --json streams: one compact document per refresh and line (JSON Lines), for a script to follow.
    indent = None if args.watch else 2

    def render_item() -> str:
        path = config.spool / args.queue / "status" / f"{args.item}.json"
        queue = config.queues[args.queue]
        document = cli_shared.item_status(queue, args.item) if queue.shared else read_json(path)
        if document is None and queue.shared:
            raise CliError(f"no item {statusview.shown(args.item)!r} in the shared queue {args.queue!r}", EX_NOINPUT)
        if document is None:
            raise CliError(f"no item {statusview.shown(args.item)!r} in queue {args.queue!r} "
                           f"({statusview.shown(path)} does not exist)", EX_NOINPUT)  # fmt: skip
        # ensure_ascii: control characters and surrogate-escaped bytes leave as \uXXXX, never raw.
        return json.dumps(document, indent=indent, ensure_ascii=True) if args.json else statusview.render_item(document)

    def render_queues() -> str:
        data = statusview.summary(config.spool, queues)
        for name in queues:
            if config.queues[name].shared is not None:
                data["queues"][name] = cli_shared.summary(config.queues[name])
        if args.json:
            return json.dumps(data, indent=indent, ensure_ascii=True)
        return statusview.render_table(data, is_all=args.all or bool(args.queue))

    if args.item and ("/" in args.item or args.item in (".", "..")):
        raise CliError(f"no item {statusview.shown(args.item)!r}: an item name is one path component", EX_USAGE)
    render = render_item if args.item else render_queues
    if args.watch:
        statusview.watch(render, is_stream=args.json)
    else:
        print(render())
    return EX_OK


def cmd_retry(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    pick_queues(config, args.queue)
    if bool(args.item) == bool(args.all):
        raise CliError("say which failed item to retry, or --all", EX_USAGE)
    if config.queues[args.queue].shared is not None:
        moved = cli_shared.retry(config.queues[args.queue], args.item)
        for name in moved:
            print(f"{args.queue}/{name}: back in the shared inbox")
        nudge_daemon(config)
        if not moved:
            print(f"{args.queue}: no failed items")
        return EX_OK
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
    nudge_daemon(config)
    if not retried:
        print(f"{args.queue}: no failed items")
    return EX_OK


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


def cmd_schema(args: argparse.Namespace) -> int:
    file_name = SCHEMAS.get(args.name)
    if file_name is None:
        raise CliError(f"no schema named {args.name!r}; schemas: {', '.join(SCHEMAS)}", EX_USAGE)
    print(resources.files("spoold").joinpath("schemas", file_name).read_text(encoding="utf-8"), end="")
    return EX_OK
