"""Which items of a shared inbox this node tries to claim next: the inbox as last listed.

Two listings (the inbox and the claims) serve many claims: as room frees up, the next
candidate comes from the last listing until it is older than `TODO_SECONDS`. An older
listing's unclaimed items have likely been taken and finished by other nodes meanwhile,
and a claim on one of those succeeds (its claim is gone) and costs a GET and a DELETE
to find out; so when that happens the listing is dropped at once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Container
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spoold.transports.s3_shared import ClaimSeen, InboxEntry, ShareStore

TODO_SECONDS = 0.5


class Candidates:
    def __init__(self) -> None:
        self.todo: list[tuple[InboxEntry, ClaimSeen | None]] = []
        self.listed = (0.0, 0.0)  # (monotonic, store clock) when the claims were listed
        self.asked_at = 0.0  # monotonic, when the listing was asked for
        self.is_stale = False
        self.lock = threading.Lock()
        # Items this node finished lately, and when (monotonic): a listing asked for before may still hold them.
        self.ended: dict[str, float] = {}

    def needs_listing(self, force: bool) -> bool:
        return force or self.is_stale or bool(self.todo and time.monotonic() - self.asked_at > TODO_SECONDS)

    def refresh(self, store: ShareStore) -> None:
        self.is_stale, self.asked_at = False, time.monotonic()
        entries = store.list_inbox()
        claims, store_now = store.list_claims() if entries else ({}, 0.0)
        # Nodes that list the same inbox at once would all try its first item: each starts elsewhere.
        random.shuffle(entries)
        entries.sort(key=lambda e: e.name in claims)
        self.todo = [(entry, claims.get(entry.name)) for entry in entries]
        self.listed = (time.monotonic(), store_now)
        with self.lock:
            self.ended = {name: at for name, at in self.ended.items() if at >= self.asked_at}

    def pop(self, held: Container[str]) -> tuple[InboxEntry, ClaimSeen | None, float] | None:
        """The next candidate not held here, its claim as listed, and the store's clock now (estimated)."""
        while self.todo:
            entry, seen = self.todo.pop(0)
            with self.lock:
                if entry.name in held or entry.name in self.ended:
                    continue
            return entry, seen, self.listed[1] + time.monotonic() - self.listed[0]
        return None

    def item_ended(self, name: str) -> None:
        with self.lock:
            self.ended[name] = time.monotonic()
