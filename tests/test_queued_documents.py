"""A queue with many waiting items keeps only a few sidecar documents in memory (issue 16: memory in a burst).

The documents of waiting items beyond `KEEP_LOADED` are read from disk when the item is dispatched, so a
burst of 100,000 queued items costs names, not documents; what runs is the same document the book holds.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from spoold.daemon import queues
from spoold.daemon.claiming import create_sidecar
from spoold.daemon.config import parse_config
from spoold.daemon.layout import SpoolLayout
from spoold.daemon.queues import QueueBook
from spoold.daemon.sidecar import Sidecar


def test_waiting_items_beyond_a_few_are_not_held_in_memory(tmp_path: Path) -> None:
    config = parse_config(json.dumps({"spool": str(tmp_path / "spool"), "queues": {
        "q": {"concurrency": 4, "chain": ["checksum"]}}}), "<test>")  # fmt: skip
    layout = SpoolLayout(config.spool, config.queues)
    layout.ensure()
    folders, queue = layout.queues["q"], config.queues["q"]
    count = queues.KEEP_LOADED * 3
    for n in range(count):
        name = f"item{n:04d}"
        (folders.work / name).mkdir()
        (folders.work / name / name).write_bytes(b"x")
        create_sidecar(config, queue, folders, name, original_name=name, kind="file", fields={},
                       payload=[name]).write()  # fmt: skip
    book = QueueBook(config, queue, folders)
    book.recover()
    assert len(book.pending) == count
    loaded = [name for name, sidecar in book.sidecars.items() if sidecar is not None]
    assert len(loaded) <= queues.KEEP_LOADED, f"{len(loaded)} documents held for {count} waiting items"

    started: list[Sidecar] = []

    def start_worker(_book: QueueBook, sidecar: Sidecar, _arriving: object) -> threading.Thread:
        started.append(sidecar)
        return threading.Thread()

    for _ in range(count // queue.spec.concurrency):
        book.dispatch(start_worker)
        for name in list(book.running):
            book.running.pop(name)
    assert [s.name for s in started] == [f"item{n:04d}" for n in range(count)], "not every item was dispatched"
    assert all(s.state == "queued" and s.doc["item"] == s.name for s in started)
    # The one a worker gets is the one the book records the outcome on.
    assert all(book.sidecars[s.name] is s for s in started)


def test_an_item_whose_sidecar_vanished_while_waiting_is_forgotten(tmp_path: Path) -> None:
    config = parse_config(json.dumps({"spool": str(tmp_path / "spool"), "queues": {
        "q": {"chain": ["checksum"]}}}), "<test>")  # fmt: skip
    layout = SpoolLayout(config.spool, config.queues)
    layout.ensure()
    folders, queue = layout.queues["q"], config.queues["q"]
    book = QueueBook(config, queue, folders)
    for n in range(queues.KEEP_LOADED + 2):
        name = f"i{n}"
        (folders.work / name).mkdir()
        (folders.work / name / name).write_bytes(b"x")
        sidecar = create_sidecar(config, queue, folders, name, original_name=name, kind="file", fields={},
                                 payload=[name])  # fmt: skip
        sidecar.write()
        book.track(sidecar)
    last = f"i{queues.KEEP_LOADED + 1}"
    assert book.sidecars[last] is None
    folders.sidecar_path(last).unlink()
    book.pending.rotate(1)  # the vanished one first
    book.dispatch(lambda _b, _s, _a: threading.Thread())
    assert last not in book.sidecars and last not in book.states and len(book.running) == 1
