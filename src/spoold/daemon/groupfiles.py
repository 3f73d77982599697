"""The files of gathering (`gather`): a group item made from its members' files, and the members' folders.

What the sidecars of a gathering say is read here too: a member's `gather` record, and a group item's
origin (`gather:<key>`) and member list. Each function acts on files and returns; `gather.Gathering`
decides when.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold.daemon.claiming import adopt_orphan
from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import HANDOFF_FILE, HANDOFF_PREFIX, ITEM_DIR_MODE, QueueFolders, link_or_copy
from spoold.daemon.recovery import settle_finished
from spoold.daemon.sidecar import Sidecar
from spoold.fsio import fsync_dir, remove_tree, write_json_atomic
from spoold.templates import BUILTIN_NAMES

ORIGIN_PREFIX = "gather:"


# ---- what the sidecars say -----------------------------------------------------------------------------------


def is_group_item(sidecar: Sidecar) -> bool:
    return str(sidecar.doc.get("forwarded_from") or "").startswith(ORIGIN_PREFIX)


def group_key(group: Sidecar) -> str:
    return str(group.doc.get("forwarded_from") or "")[len(ORIGIN_PREFIX) :]


def gathered_members(group: Sidecar) -> dict[str, str]:
    """A group item's members: expected value -> member item name."""
    gathered = group.doc.get("gathered")
    members = gathered.get("members") if isinstance(gathered, dict) else None
    return {str(k): str(v) for k, v in members.items()} if isinstance(members, dict) else {}


def member_info(sidecar: Sidecar) -> dict[str, Any] | None:
    """A member's `gather` record (`group`, `member`, `item`, ...), when it has a usable one."""
    info = sidecar.doc.get("gather")
    if not isinstance(info, dict) or not isinstance(info.get("group"), str) or not isinstance(info.get("member"), str):
        return None
    if not isinstance(info.get("item"), (str, type(None))):
        return None
    return info


def group_item_of(folders: QueueFolders, name: str, key: str) -> Sidecar | None:
    """The sidecar of item `name` if it is the group item of group `key`; None if there is no such item."""
    sidecar = Sidecar.load(folders.sidecar_path(name))
    if sidecar is None or sidecar.doc.get("forwarded_from") != f"{ORIGIN_PREFIX}{key}":
        return None
    return sidecar


def template_values(config: Config, queue: Queue, member: Sidecar) -> dict[str, Any]:
    """What `by` may name: the member's fields, then the built-ins as `ItemContext.template_values` has them."""
    name = member.name
    stem, dot, ext = name.rpartition(".")
    values: dict[str, Any] = {k: v for k, v in member.doc["fields"].items() if k not in BUILTIN_NAMES}
    values.update(name=name, stem=stem if dot else name, ext=ext if dot else "", queue=queue.name, host=config.host,
                  date=datetime.now(UTC).strftime("%Y-%m-%d"), item=name,
                  original_name=member.doc.get("original_name", name))  # fmt: skip
    return values


def duration_text(seconds: float) -> str:
    """`2h`, `90m`, `1.5s`: the timeout as a config would say it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# ---- files ---------------------------------------------------------------------------------------------------


def member_contents(folder: Path, bundle: str | None) -> list[tuple[Path, str]]:
    """A member folder's files as (path, name in the group): the entry named `bundle`, when a folder, gives its
    contents; anything else itself. Hidden entries are the daemon's own."""
    try:
        entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    pairs: list[tuple[Path, str]] = []
    for entry in entries:
        path = folder / entry
        if entry == bundle and path.is_dir() and not path.is_symlink():
            pairs += [(path / child, child) for child in sorted(os.listdir(path))]
        else:
            pairs.append((path, entry))
    return pairs


def make_group_item(config: Config, queue: Queue, folders: QueueFolders, name: str, key: str,
                    members: dict[str, Sidecar]) -> Sidecar | None:  # fmt: skip
    """The group item under exactly `name`, holding `<name>/<value>/` per member; None if `name` is taken.

    Built in a staging folder that recovery removes, renamed into work/ with a hand-over record that
    recovery adopts, then given its sidecar: a crash at any point leaves nothing, or a whole item.
    """
    docs = [m.doc["fields"] for m in members.values()]
    common = {k: v for k, v in docs[0].items() if all(k in d and d[k] == v for d in docs[1:])}
    record = {"origin": f"{ORIGIN_PREFIX}{key}", "original_name": key, "kind": "bundle", "fields": common,
              "payload": [name], "extras": [], "digests": {}}  # fmt: skip
    stage = folders.work / f"{HANDOFF_PREFIX}gather-{uuid.uuid4().hex}"
    os.mkdir(stage, ITEM_DIR_MODE)
    try:
        for value, member in members.items():
            (stage / name / value).mkdir(parents=True)
            for source, relative in member_contents(folders.work / member.name, member.name):
                # Hard links: no second copy of the recordings, and the members' files stay until step 5.
                link_or_copy(source, stage / name / value / relative)
        write_json_atomic(stage / HANDOFF_FILE, record)
        with folders.lock:
            if folders.is_name_taken(name):
                remove_tree(stage)
                return None
            os.rename(stage, folders.work / name)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_tree(stage)
        raise
    fsync_dir(folders.work)
    return adopt_orphan(config, queue, folders, name)


def drop_member_data(folders: QueueFolders, member: Sidecar) -> None:
    """The member's files live on in its group item, so its own folder lets them go."""
    for entry, _relative in member_contents(folders.work / member.name, None):
        remove_tree(entry)


def move_finished(queue: Queue, folders: QueueFolders, member: Sidecar, state: str) -> None:
    """Move a member that ended with its group item to done/ or failed/, like any finished item."""
    name = member.name
    if (folders.work / name).exists():
        settle_finished(queue, folders, member, state)
    elif state == "done" and (folders.failed / name).exists():
        # A retried group item succeeded: its members leave failed/ too.
        remove_tree(folders.done / name)
        if queue.spec.keep.done == "delete":
            remove_tree(folders.failed / name)
        else:
            os.rename(folders.failed / name, folders.done / name)
