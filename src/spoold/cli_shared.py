"""`spoold drop`, `status` and `retry` on a shared queue: they act on the store, so they work from any node.

drop puts each path into `<prefix>inbox/` (a folder: its files under `inbox/<name>/`, then
`inbox/<name>.ready`); status reads `<prefix>status/` and the inbox; retry moves `<prefix>failed/<name>`
back into the inbox and forgets its status, and nudges the local daemon to look at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold.cli_base import EX_CANTCREAT, EX_FAIL, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE, CliError
from spoold.daemon.config import Queue
from spoold.daemon.shared_items import name_problem
from spoold.errors import StepError
from spoold.statusview import brief, shown

if TYPE_CHECKING:
    from spoold.transports.s3_shared import ShareStore

FINAL_STATES = ("done", "failed")
POLL_SECONDS = 0.5


def open_store(queue: Queue) -> ShareStore:
    from spoold.transports.s3_shared import ShareStore

    assert queue.shared is not None
    try:
        return ShareStore(queue.shared.bucket, queue.shared.prefix, queue.shared.settings)
    except StepError as exc:
        raise CliError(f"{queue.name}: cannot reach the shared store: {exc}", EX_TEMPFAIL) from None


def drop(queue: Queue, paths: list[Path], wait: bool, timeout: float | None) -> int:
    store = open_store(queue)
    try:
        for path in paths:
            if problem := name_problem(path.name):
                raise CliError(f"{shown(path)}: {problem}", EX_USAGE)
            if not path.exists() or path.is_symlink():
                raise CliError(f"{shown(path)}: no such file or folder (links are not followed)", EX_NOINPUT)
        inbox = {entry.name for entry in store.list_inbox()}
        for path in paths:
            if path.name in inbox:
                raise CliError(f"{queue.name}: {shown(path.name)} is already in the shared inbox; not overwriting it",
                               EX_CANTCREAT)  # fmt: skip
        for path in paths:
            store.put_path(path, path.name)
            print(f"dropped {shown(path)} into {queue.name} ({store.where('inbox', path.name)})", flush=True)
        return _wait(store, queue, [p.name for p in paths], timeout) if wait else EX_OK
    except StepError as exc:
        raise CliError(f"{queue.name}: {exc}", EX_TEMPFAIL) from None
    finally:
        store.close()


def _wait(store: ShareStore, queue: Queue, names: list[str], timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    pending, code = list(names), EX_OK
    while pending:
        inbox = _inbox_names(store)  # one listing per round, not one per pending item
        for name in list(pending):
            document = store.read_status(name)
            if document and document.get("state") in FINAL_STATES and name not in inbox:
                pending.remove(name)
                code = code if document["state"] == "done" else EX_FAIL
                print(f"{queue.name}/{shown(name)}: {document['state']} (node {shown(document.get('node'))})",
                      flush=True)  # fmt: skip
        if pending and deadline is not None and time.monotonic() >= deadline:
            print(f"{queue.name}: still waiting for {len(pending)} item(s); gave up after the timeout", flush=True)
            return EX_TEMPFAIL
        if pending:
            time.sleep(POLL_SECONDS)  # a poll of the store, which sends no events
    return code


def _inbox_names(store: ShareStore) -> set[str]:
    return {entry.name for entry in store.list_inbox()}


def item_status(queue: Queue, item: str) -> dict[str, Any] | None:
    store = open_store(queue)
    try:
        return store.read_status(item)
    except StepError as exc:
        raise CliError(f"{queue.name}: cannot read the shared store: {exc}", EX_TEMPFAIL) from None
    finally:
        store.close()


def summary(queue: Queue) -> dict[str, Any]:
    """Every item of the shared queue: its status in the store, or `queued` while only the inbox holds it."""
    store = open_store(queue)
    try:
        inbox = _inbox_names(store)
        items: list[dict[str, Any]] = []
        for name in store.list_names("status"):
            document = store.read_status(name)
            if document is None:
                continue
            if name in inbox and document.get("state") in FINAL_STATES:
                continue  # a retried or re-sent item: the old status is history
            items.append({**brief(document), "item": name, "node": document.get("node")})
        seen = {item["item"] for item in items}
        items += [{**brief({"item": name, "state": "queued"}), "node": None} for name in sorted(inbox - seen)]
    except StepError as exc:
        raise CliError(f"{queue.name}: cannot read the shared store: {exc}", EX_TEMPFAIL) from None
    finally:
        store.close()
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item["state"])] = counts.get(str(item["state"]), 0) + 1
    assert queue.shared is not None
    return {"source": queue.shared.url, "counts": counts, "items": items}


def retry(queue: Queue, item: str | None) -> list[str]:
    """Move the failed (or done) item, or every failed one, back into the shared inbox; the names moved."""
    store = open_store(queue)
    try:
        if item is not None and ("/" in item or name_problem(item)):
            raise CliError(f"{queue.name}/{shown(item)}: not an item name", EX_USAGE)
        names = [item] if item else store.list_names("failed")
        moved = []
        for name in names:
            # Named, a done item may run again too (`--all` means the failed ones).
            if store.move(name, "failed", "inbox") or (item and store.move(name, "done", "inbox")):
                store.delete(store.key("status", f"{name}.json"))
                moved.append(name)
            elif item:
                raise CliError(f"{queue.name}/{shown(name)} is neither in failed/ nor in done/ of the shared queue",
                               EX_NOINPUT)  # fmt: skip
        return moved
    except StepError as exc:
        raise CliError(f"{queue.name}: {exc}", EX_TEMPFAIL) from None
    finally:
        store.close()
