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
# With an empty inbox the claims are listed only every this many listings, to find claims left behind.
JANITOR_EVERY = 10
ORPHANS_PER_LISTING = 20


class Candidates:
    def __init__(self) -> None:
        self.todo: list[tuple[InboxEntry, ClaimSeen | None]] = []
        self.listed = (0.0, 0.0)  # (monotonic, store clock) when the claims were listed
        self.asked_at = 0.0  # monotonic, when the listing was asked for
        self.is_stale = False
        self.lock = threading.Lock()
        # Items this node finished lately, and when (monotonic): a listing asked for before may still hold them.
        self.ended: dict[str, float] = {}
        self.listings = 0

    def needs_listing(self, force: bool) -> bool:
        return force or self.is_stale or bool(self.todo and time.monotonic() - self.asked_at > TODO_SECONDS)

    def refresh(self, store: ShareStore, stale_after: float) -> None:
        """List again; a claim older than `stale_after` (by the store's clock) may be taken over."""
        self.is_stale, self.asked_at, self.listings = False, time.monotonic(), self.listings + 1
        entries = store.list_inbox()
        claims, store_now = store.list_claims() if entries or self.listings % JANITOR_EVERY == 0 else ({}, 0.0)
        names = {entry.name for entry in entries}
        # A claim whose lease ran out on an item no longer in the inbox (its holder died after moving it) would
        # never be taken over: it goes.
        orphans = [n for n, seen in claims.items() if n not in names and store_now - seen.modified > stale_after]
        for name in orphans[:ORPHANS_PER_LISTING]:
            store.delete_claim(name)

        def order(entry: InboxEntry) -> int:
            seen = claims.get(entry.name)
            return 1 if seen is None else 0 if store_now - seen.modified > stale_after else 2

        # Nodes that list the same inbox at once would all try its first item: each starts elsewhere. Items
        # whose holder died come first (they have waited longest); those held now are not candidates.
        random.shuffle(entries)
        entries.sort(key=order)
        self.todo = [(entry, claims.get(entry.name)) for entry in entries if order(entry) < 2]
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
