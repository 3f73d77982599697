"""`spoold drop QUEUE PATH... [--wait [--timeout 10m]]`: copy into an inbox safely, then maybe wait.

Each path is copied under a hidden temp name the daemon ignores, then renamed into the inbox in one step.
With `--wait`, drop then follows each item's sidecar until it is `done` or `failed`, printing one line per
item as it ends, and exits 0 (all done), 1 (any failed) or 75 (EX_TEMPFAIL: `--timeout` passed first).

Finding the item a drop became: the daemon names it after the inbox entry, unless that name is taken
(`foo.mp4` -> `foo.1.mp4`) or too long (cut, with a hash), and a request drops its `.json`; the sidecar
keeps the entry's name as `original_name`. A candidate is a sidecar with that `original_name`, created
after the drop. What makes it certain is the inode: the claim renames the dropped file or folder into
`work/<item>/` (a request keeps its entry's name there), so the dropped inode sits in the item's folder
in work/, done/ or failed/, and another process's drop of the same name holds another one. When no folder
holds it any more (a step replaced the payload, the queue keeps no done data), the only candidate is taken
once it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from spoold.cli_base import EX_CANTCREAT, EX_FAIL, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE, CliError, pick_queues
from spoold.daemon.config import load_config
from spoold.daemon.layout import QueueFolders
from spoold.fsio import parse_iso, read_json
from spoold.options import parse_duration
from spoold.statusview import daemon_state, shown

FINAL_STATES = ("done", "failed")
EX_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
POLL_FIRST_SECONDS, POLL_MAX_SECONDS, POLL_GROWTH = 0.05, 1.0, 1.5
MESSAGE_CHARS = 500


@dataclasses.dataclass
class Dropped:
    """One path dropped into the inbox, and once found, the item it became."""

    entry: str
    inode: tuple[int, int]
    since: float
    item: str | None = None
    last: dict[str, Any] | None = None
    # Sidecars known not to be this drop's (another name, created before): neither ever changes.
    others: set[str] = dataclasses.field(default_factory=set)


def add_arguments(drop: argparse.ArgumentParser) -> None:
    drop.add_argument("queue")
    drop.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    drop.add_argument("--wait", action="store_true", help="wait until each item is done or failed "
                                                           "(exit 0: all done, 1: any failed, 75: timed out)")
    drop.add_argument("--timeout", metavar="DURATION", help="with --wait: give up after this long (30s, 10m, 2h)")


def parse_timeout(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(parse_duration(float(text) if re.fullmatch(r"\d+(\.\d+)?", text.strip()) else text))
    except ValueError as exc:
        raise CliError(f"--timeout: {exc}", EX_USAGE) from None


def cmd_drop(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    pick_queues(config, args.queue)
    if args.timeout is not None and not args.wait:
        raise CliError("--timeout goes with --wait", EX_USAGE)
    timeout = parse_timeout(args.timeout)
    queue = config.queues[args.queue]
    if queue.shared is not None:
        from spoold import cli_shared

        return cli_shared.drop(queue, args.paths, args.wait, timeout)
    inbox = config.spool / args.queue / "inbox"
    if not inbox.is_dir():
        raise CliError(f"{inbox} does not exist; start spoold once (or run spoold init) to create it", EX_NOINPUT)
    names = [path.name for path in args.paths]
    if len(set(names)) != len(names):
        twice = sorted({shown(n) for n in names if names.count(n) > 1})
        raise CliError(f"two paths have the same name ({', '.join(twice)}); an inbox holds one of each", EX_USAGE)
    for path in args.paths:
        if not path.exists() or path.is_symlink():
            raise CliError(f"{shown(path)}: no such file or folder (links are not followed)", EX_NOINPUT)
        if (inbox / path.name).exists():
            raise CliError(f"{shown(inbox / path.name)} already exists; not overwriting it", EX_CANTCREAT)
    folders, dropped = QueueFolders(config.spool, args.queue), []
    try:
        for path in args.paths:
            dropped.append(drop_one(path, inbox, is_marker_wanted=path.is_dir() and queue.spec.ready == "marker"))
            print(f"dropped {shown(path)} into {args.queue}", flush=True)
        return wait_for_items(folders, dropped, timeout) if args.wait else EX_OK
    except KeyboardInterrupt:
        if not args.wait:
            raise
        # Ctrl-C between a drop and the start of the wait: the same answer as during the wait.
        raise CliError(f"stopped waiting; the daemon goes on with: {_pending(folders, dropped)}",
                       EX_INTERRUPTED) from None  # fmt: skip


def drop_one(path: Path, inbox: Path, *, is_marker_wanted: bool) -> Dropped:
    # A hidden temp name is ignored by the daemon until the rename makes it whole at once. Not derived from the
    # name: a name of 255 bytes is a name too, and its temp name must fit as well.
    tmp = inbox / f".spoold-drop-{secrets.token_hex(8)}"
    try:
        if path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp, symlinks=True)
        else:
            shutil.copy2(path, tmp)
        info = os.lstat(tmp)
        since = time.time()
        os.rename(tmp, inbox / path.name)
        if is_marker_wanted:
            marker_tmp = inbox / f".spoold-drop-{secrets.token_hex(8)}.ready"
            marker_tmp.write_text("{}\n", encoding="utf-8")
            os.rename(marker_tmp, inbox / f"{path.name}.ready")
    except OSError as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise CliError(f"cannot drop {shown(path)}: {exc.strerror}", EX_CANTCREAT) from None
    return Dropped(path.name, (info.st_dev, info.st_ino), since)


def wait_for_items(folders: QueueFolders, dropped: list[Dropped], timeout: float | None) -> int:
    """Follow each dropped item until it ends; print a line per item as it does. Polls with a backoff."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending, code, delay = list(dropped), EX_OK, POLL_FIRST_SECONDS
    try:
        if not daemon_state(read_json(folders.root.parent / "health.json"))["running"]:
            print(f"spoold: warning: no daemon is running on {shown(folders.root.parent)}; waiting anyway",
                  file=sys.stderr)  # fmt: skip
        while True:
            for drop in list(pending):
                document = find_item(folders, drop)
                if document is not None and document.get("state") in FINAL_STATES:
                    pending.remove(drop)
                    print(outcome_line(folders.name, drop, document), flush=True)
                    code = EX_FAIL if document["state"] == "failed" else code
            if not pending:
                return code
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CliError(f"timed out after {timeout:g}s; still not finished: {_pending(folders, pending)}",
                               EX_TEMPFAIL)  # fmt: skip
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * POLL_GROWTH, POLL_MAX_SECONDS)
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting; the daemon goes on with: {_pending(folders, pending)}",
                       EX_INTERRUPTED) from None  # fmt: skip


def _pending(folders: QueueFolders, pending: list[Dropped]) -> str:
    return ", ".join(pending_text(folders.name, d) for d in pending)


def find_item(folders: QueueFolders, drop: Dropped) -> dict[str, Any] | None:
    """The sidecar of the item `drop` became, once it can be told; None before that."""
    if drop.item is not None:
        document = read_json(folders.sidecar_path(drop.item))
        # Gone (pruned, or being rewritten by a `spoold retry`): what was seen last is the best answer.
        drop.last = document if document is not None and document.get("item") == drop.item else drop.last
        return drop.last
    candidates = _candidates(folders, drop)
    for document in candidates:
        if _holds_drop(folders, drop, document):
            drop.item, drop.last = str(document["item"]), document
            return document
    if len(candidates) == 1 and candidates[0].get("state") in FINAL_STATES:
        drop.item, drop.last = str(candidates[0]["item"]), candidates[0]
        return candidates[0]
    return None


def _candidates(folders: QueueFolders, drop: Dropped) -> list[dict[str, Any]]:
    """Sidecars written since the drop, created after it, for an item dropped under the same name."""
    since_ms = math.floor(drop.since * 1000) / 1000
    found = []
    try:
        with os.scandir(folders.status) as entries:
            names = [e.name for e in entries if e.name.endswith(".json") and not e.name.startswith(".")
                     and e.name not in drop.others and e.stat(follow_symlinks=False).st_mtime >= since_ms - 1]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CliError(f"cannot read {shown(folders.status)}: {exc.strerror}", EX_NOINPUT) from None
    for name in sorted(names):
        document = read_json(folders.status / name)
        if document is None or document.get("schema") != "spoold.status/1" or not isinstance(document.get("item"), str):
            continue
        created = parse_iso(document.get("created")) if isinstance(document.get("created"), str) else None
        if document.get("original_name") != drop.entry or created is None or created < since_ms:
            drop.others.add(name)
            continue
        found.append(document)
    return found


def _holds_drop(folders: QueueFolders, drop: Dropped, document: dict[str, Any]) -> bool:
    """Whether the item's folder (in work/, done/ or failed/) holds the inode that was dropped."""
    item = str(document["item"])
    if "/" in item or item in ("", ".", ".."):
        return False
    for where in ("work", "done", "failed"):
        for inner in dict.fromkeys((item, drop.entry)):
            with contextlib.suppress(OSError):
                info = os.lstat(folders.item_dir(item, where) / inner)
                if (info.st_dev, info.st_ino) == drop.inode:
                    return True
    return False


def outcome_line(queue: str, drop: Dropped, document: dict[str, Any]) -> str:
    """`episodes/ep_5: done in 3.2 s` or `episodes/ep_5: failed at ship: <error>`."""
    head = _label(queue, drop)
    if document.get("state") == "done":
        began, ended = parse_iso(document.get("created")), parse_iso(document.get("updated"))
        took = f" in {max(ended - began, 0.0):.1f} s" if began is not None and ended is not None else ""
        return f"{head}: done{took}"
    found = document.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    message = shown(error.get("message") or "no reason recorded", MESSAGE_CHARS)
    if error.get("type") == "rejected":
        return f"{head}: rejected: {message}"
    step = error.get("step") or document.get("step")
    return f"{head}: failed at {shown(step, 80)}: {message}" if step else f"{head}: failed: {message}"


def pending_text(queue: str, drop: Dropped) -> str:
    if drop.last is None:
        return f"{_label(queue, drop)} (not found in status/ yet)"
    state, step = shown(drop.last.get("state"), 20), drop.last.get("step")
    return f"{_label(queue, drop)} ({state}{f' at {shown(step, 80)}' if step else ''})"


def _label(queue: str, drop: Dropped) -> str:
    item = drop.item or drop.entry
    dropped_as = f" (dropped as {shown(drop.entry, 200)})" if drop.item and drop.item != drop.entry else ""
    return f"{shown(queue, 200)}/{shown(item, 200)}{dropped_as}"
