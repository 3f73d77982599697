"""A shared queue on this node: its inbox is an S3 prefix that every node naming it serves.

Each item is held by exactly one node at a time, through a claim object in the
store (`<prefix>claims/<name>.json`): created with `If-None-Match: *`, renewed
with `If-Match` on its ETag every third of the lease, and taken over by another
node with `If-Match` on the stale ETag once the store's own clock says the lease
has run out (the reply's `Date` minus the claim's `Last-Modified`). A holder
counts its lease from the moment it sent the last write that succeeded and gives
the item up a quarter of a lease before that runs out, so by the time another
node may take it, the holder has stopped; the main loop checks those deadlines
every tick, without waiting on the store. A lost claim stops the item at its
next checkpoint and drops it from this node.

One thread lists the inbox every `poll` (and at once after `spoold retry`),
claims what the queue has room for, renews, and mirrors running items' sidecars
to `<prefix>status/`; a small pool downloads claimed items into work/ and, once
the chain has ended, writes the final status, moves the item to `done/` or
`failed/` and deletes the claim. The main loop hears of new items
(`ItemAdopted`) and lost ones (`ClaimLost`) by messages only.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from spoold.daemon import shared_items
from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import QueueFolders
from spoold.daemon.logs import about
from spoold.daemon.messages import ClaimLost, ItemAdopted, Message
from spoold.daemon.shared_items import ClaimRecords, Held, new_claim
from spoold.daemon.shared_listing import Candidates
from spoold.daemon.sidecar import Sidecar
from spoold.errors import ConfigError, Interrupted, PermanentError, StepError

if TYPE_CHECKING:
    from spoold.transports.s3_shared import InboxEntry, ShareStore

log = logging.getLogger("spoold.shared")

Renewal = Literal["renewed", "lost", "unreachable"]

# A store whose `Date` and `Last-Modified` are whole seconds can read a fresh claim as up to a second old.
STORE_CLOCK_SLACK = 1.0
COUNTERS = ("won", "lost", "renewed", "taken_over")
# How often a running item's changed sidecar is copied to `<prefix>status/`, for `spoold status` elsewhere.
MIRROR_SECONDS = 5.0


class SharedQueue:
    def __init__(self, config: Config, queue: Queue, folders: QueueFolders, post: Callable[[Message], None],
                 may_claim: Callable[[], bool]) -> None:  # fmt: skip
        assert queue.shared is not None
        self.config, self.queue, self.folders, self.post, self.may_claim = config, queue, folders, post, may_claim
        self.source, self.lease, self.node = queue.shared, queue.shared.lease_seconds, config.host
        self.records = ClaimRecords(folders)
        self.lock = threading.Lock()
        self.held: dict[str, Held] = {}
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.is_probed = False
        self.candidates = Candidates()
        self.relist = False
        self.store: ShareStore | None = None
        self.pool = ThreadPoolExecutor(max_workers=queue.spec.concurrency + 1, thread_name_prefix=f"{queue.name}/s3")
        self.thread = threading.Thread(target=self._serve, name=f"{queue.name}/shared", daemon=True)

    # ---- start and stop ------------------------------------------------------------------------------------

    def start_up(self) -> None:
        """Connect, probe the store, and sort out the claims a previous run left; then serve in a thread.

        Raises ConfigError when the store ignores conditional writes: sharing would not be safe there.
        """
        from spoold.transports.s3_shared import ShareStore

        self.records.ensure()
        # Timeouts well inside a lease: a blackholed store must not hold the thread past a renewal.
        timeout = max(1.0, min(30.0, self.lease / 8))
        self.store = ShareStore(self.source.bucket, self.source.prefix,
                                {**self.source.settings, "connect_timeout": timeout, "read_timeout": timeout})
        self._probe(at_start=True)
        self._recover()
        self.thread.start()

    def _probe(self, at_start: bool = False) -> None:
        from spoold.transports.s3_shared import ConditionsIgnored

        assert self.store is not None
        try:
            self.store.probe(self.node)
        except ConditionsIgnored as exc:
            if at_start:
                raise ConfigError(str(exc), file=self.config.source, path=f"queues.{self.queue.name}.source") from None
            log.error("%s: %s; this node serves none of its items", self.queue.name, exc)
            self.stopping.set()  # the thread ends; running nothing is the safe answer
        except StepError as exc:
            log.warning("%s: cannot reach the shared store yet (%s); claiming waits for it", self.queue.name, exc)
            return
        self.is_probed = True

    def stop(self) -> None:
        """Stop claiming and renewing; claims stay in the store, so a quick restart resumes them."""
        self.stopping.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    def reconfigure(self, config: Config, queue: Queue) -> None:
        """A reload: the chain and `concurrency` may change, the source may not (the server refuses that)."""
        self.config, self.queue = config, queue

    def poll_now(self) -> None:
        self.relist = True
        self.wake.set()

    # ---- what the main loop asks --------------------------------------------------------------------------

    def expire(self, now: float) -> list[str]:
        """Local items whose lease this node can no longer vouch for: the main loop stops and drops them."""
        vouched = self.lease * 3 / 4  # a quarter of the lease is the margin for clock rates and round trips
        with self.lock:
            lost = [h for h in self.held.values() if h.phase != "finishing" and now > h.written_at + vouched]
        return [item for held in lost if (item := self._lose(held, "its lease ran out before a renewal got "
                                                              "through")) is not None]  # fmt: skip

    def next_deadline(self) -> float | None:
        with self.lock:
            return min((h.written_at + self.lease * 3 / 4 for h in self.held.values() if h.phase != "finishing"),
                       default=None)  # fmt: skip

    def item_finished(self, item: str, sidecar: Sidecar | None) -> None:
        """The chain of a local item ended for now; a final state is carried to the store."""
        with self.lock:
            held = next((h for h in self.held.values() if h.item == item), None)
            if held is None or sidecar is None or sidecar.state not in ("done", "failed"):
                return
            held.phase = "finishing"
        self.pool.submit(self._guarded, self._finish, held)

    def snapshot(self) -> dict[str, Any]:  # for health.json and metrics.prom
        with self.lock:
            return {"source": self.source.url, "node": self.node, "held": len(self.held), "claims": dict(self.counts)}

    # ---- the thread ----------------------------------------------------------------------------------------

    def _serve(self) -> None:
        next_poll = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if not self.is_probed:
                self._guarded(self._probe)
            self._guarded(self._renew_due, now)
            relist, self.relist = now >= next_poll or self.relist, False
            if self.wake.is_set() or relist:
                self.wake.clear()
                if relist:
                    next_poll = now + self.source.poll_seconds
                if self.is_probed:
                    self._guarded(self._poll, relist)
            with self.lock:
                renewals = [max(h.written_at + self.lease / 3, h.retry_at) for h in self.held.values()]
            self.wake.wait(max(0.05, min([next_poll, *renewals]) - time.monotonic()))

    def _guarded(self, work: Callable[..., object], *args: Any) -> None:
        """One round of the thread's or the pool's work; nothing it meets ends the thread."""
        try:
            with about(self.queue.name):
                work(*args)
        except StepError as exc:
            log.warning("%s: shared store: %s", self.queue.name, exc)
        except Exception:
            log.exception("%s: internal error in the shared queue; it goes on", self.queue.name)

    def _renew_due(self, now: float) -> None:
        assert self.store is not None
        with self.lock:
            due = [h for h in self.held.values() if now >= max(h.written_at + self.lease / 3, h.retry_at)]
        for held in due:
            if self.stopping.is_set():
                return
            self._guarded(self._renew, held)
        with self.lock:
            due = [h for h in self.held.values() if h.phase == "local" and now >= h.mirrored_at + MIRROR_SECONDS]
        for held in due:
            # Each behind its own wall: a store error on one item's status must not hold up the others'.
            held.mirrored_at = now
            self._guarded(shared_items.mirror, self.store, self.folders, held, self.node)

    def _renew(self, held: Held) -> Renewal:
        """Write the claim again with `If-Match` on its ETag; `lost` when another node has it or it is gone.

        One write at a time per claim: two with the same ETag would make the second look lost.
        """
        assert self.store is not None
        with held.writing:
            sent = time.monotonic()
            try:
                etag = self.store.write_claim(held.name, new_claim(self.node, held, self.lease), held.etag)
            except StepError as exc:
                log.warning("%s/%s: cannot renew the claim yet: %s", self.queue.name, held.label, exc)
                held.retry_at = time.monotonic() + 1.0
                return "unreachable"  # the deadline in `expire` decides
            if etag is None:
                # While the end is carried to the store, the end decides what a lost claim means.
                if held.phase != "finishing" and (item := self._lose(held, "another node holds the claim now")):
                    self.post(ClaimLost(self.queue.name, item))
                return "lost"
            with self.lock:
                held.etag, held.written_at = etag, sent
                self.counts["renewed"] += 1
            return "renewed"

    def _lose(self, held: Held, why: str) -> str | None:
        """Forget a claim this node no longer holds; the local item to stop and drop, if any."""
        with self.lock:
            if self.held.get(held.name) is not held:
                return None
            del self.held[held.name]
            self.counts["lost"] += 1
        held.stop.set()
        self.records.remove(held.name)
        log.warning("%s/%s: claim lost (%s): this node stops the item", self.queue.name, held.label, why)
        return held.item

    # ---- claiming ------------------------------------------------------------------------------------------

    def _room(self) -> int:
        with self.lock:
            busy = sum(1 for h in self.held.values() if h.phase != "finishing")
        return self.queue.spec.concurrency - busy

    def _poll(self, relist: bool) -> None:
        assert self.store is not None
        while self._room() > 0 and self.may_claim() and not self.stopping.is_set():
            if self.candidates.needs_listing(relist):
                relist = False
                self.candidates.refresh(self.store, self.lease + STORE_CLOCK_SLACK)
            if (picked := self.candidates.pop(self.held)) is None:
                return
            entry, seen, store_now = picked
            if not (entry.is_bundle or entry.has_marker) and store_now - entry.modified < self.queue.spec.settle:
                continue  # as in a local inbox, a lone file waits `settle` for a ready marker to follow it
            if seen is None:
                self._claim(entry, None)
            elif store_now - seen.modified > self.lease + STORE_CLOCK_SLACK:
                self._claim(entry, seen.etag)

    def _claim(self, entry: InboxEntry, stale_etag: str | None) -> None:
        """Create the claim, or take over a stale one (judged again on the claim's own lease); then fetch."""
        assert self.store is not None
        attempt = 1
        if stale_etag is not None:
            claim = self.store.read_claim(entry.name)
            if claim is None:
                return
            lease = claim.document.get("lease_s")
            lease = float(lease) if isinstance(lease, (int, float)) and not isinstance(lease, bool) else self.lease
            if claim.store_now - claim.modified <= max(lease, self.lease) + STORE_CLOCK_SLACK:
                return
            stale_etag = claim.etag
            previous = claim.document.get("attempt")
            attempt = (previous if isinstance(previous, int) and not isinstance(previous, bool) else 0) + 1
        held = Held(entry.name, uuid.uuid4().hex, attempt, "", time.monotonic(), entry.is_bundle, entry.has_marker,
                    entry.size, takeover=stale_etag is not None)  # fmt: skip
        sent = time.monotonic()
        etag = self.store.write_claim(entry.name, new_claim(self.node, held, self.lease), stale_etag)
        if etag is None:
            return  # another node was first
        held.etag, held.written_at = etag, sent
        self.records.save(held)
        with self.lock:
            self.held[held.name] = held
            self.counts["taken_over" if held.takeover else "won"] += 1
        log.info("%s/%s: claimed%s (attempt %d)", self.queue.name, held.label,
                 " from a node whose lease ran out" if held.takeover else "", attempt)  # fmt: skip
        self.pool.submit(self._guarded, self._fetch, held, entry)

    # ---- the pool's work -----------------------------------------------------------------------------------

    def _check_stop(self, held: Held) -> None:
        if held.stop.is_set() or self.stopping.is_set():
            raise Interrupted("the claim was lost or the daemon is stopping")

    def _fetch(self, held: Held, entry: InboxEntry) -> None:
        assert self.store is not None
        seed = self.store.read_status(held.name) if held.takeover else None
        if seed is not None and seed.get("state") in ("done", "failed"):
            # The last holder recorded the end and died before tidying up: only the tidying is left.
            held.phase = "finishing"
            self._finish_with(held, seed)
            return
        item: str | None = None
        for attempt in range(1, self.queue.spec.retry.attempts + 1):
            try:
                item = shared_items.fetch(self.config, self.queue, self.folders, self.store, entry, held, seed,
                                          lambda: self._check_stop(held), lambda: self.records.save(held))  # fmt: skip
                break
            except Interrupted:
                return
            except PermanentError as exc:
                self._reject(held, str(exc))
                return
            except StepError as exc:
                if held.stop.is_set() or self.stopping.is_set():
                    return
                if attempt == self.queue.spec.retry.attempts:
                    self._reject(held, f"cannot download the item: {exc}")
                    return
                log.warning("%s/%s: download failed, retrying: %s", self.queue.name, held.label, exc)
                if self.stopping.wait(self.queue.spec.retry.delay_before(attempt + 1)):
                    return
        if item is None:
            log.info("%s/%s: left the shared inbox before it was downloaded", self.queue.name, held.label)
            self.candidates.is_stale = True
            self._release(held)
            return
        with self.lock:
            lost = self.held.get(held.name) is not held
            held.item, held.phase = item, "local"
        if lost:
            shared_items.drop_local(self.folders, item)
            return
        self.records.save(held)
        self.post(ItemAdopted(self.queue.name, item))

    def _reject(self, held: Held, reason: str) -> None:
        log.error("%s/%s: rejected: %s", self.queue.name, held.label, reason)
        held.phase = "finishing"
        self._finish_with(held, shared_items.rejection_document(self.config, self.queue, held.name, reason, self.node))

    def _finish(self, held: Held) -> None:
        document = shared_items.status_document(self.folders, held, self.node)
        if document is not None:
            self._finish_with(held, document)

    def _finish_with(self, held: Held, document: dict[str, Any]) -> None:
        """Carry the item's end to the store, while this node still holds it; retried on a flaky store."""
        assert self.store is not None
        attempt = 0
        while not held.stop.is_set():
            try:
                # A lease with less than half left is renewed first, so the whole end happens inside it; one
                # that cannot be renewed is not vouched for, and nothing is written on its strength.
                with held.writing:  # a status copy of the running item never lands after the end's
                    renewal = self._renew(held) if time.monotonic() > held.written_at + self.lease / 2 else "renewed"
                    if renewal == "renewed":
                        shared_items.finish(self.store, self.queue, held, document, tidy=held.takeover)
                        break
                if renewal == "lost":
                    self._lose(held, "another node holds the claim now; it records the end")
                    return
            except StepError as exc:
                log.warning("%s/%s: cannot record the end in the store yet: %s", self.queue.name, held.label, exc)
            attempt += 1
            if self.stopping.wait(min(60.0, 2.0**attempt)):
                return  # the record stays: the next start finishes it
        else:
            return
        log.info("%s/%s: %s in the shared store", self.queue.name, held.label, document.get("state"))
        self._release(held, keep_claim=True)

    def _release(self, held: Held, keep_claim: bool = False) -> None:
        """Forget the claim; delete it in the store unless the end already did."""
        if not keep_claim and self.store is not None:
            self.store.delete_claim(held.name)
        with self.lock:
            if self.held.get(held.name) is held:
                del self.held[held.name]
        self.records.remove(held.name)
        self.candidates.item_ended(held.name)
        self.wake.set()  # room for another item

    # ---- after a restart -----------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Keep the local items whose claims this node still holds; drop every other local item of the queue."""
        assert self.store is not None
        holding, self.counts["lost"] = shared_items.recover(self.store, self.records, self.folders)
        for held in holding:
            self.held[held.name] = held
            if held.item is None:
                self.pool.submit(self._guarded, self._fetch, held, held.entry())
            else:
                held.phase = "local"
                self.item_finished(held.item, Sidecar.load(self.folders.sidecar_path(held.item)))
        shared_items.drop_strays(self.folders, {h.item for h in holding if h.item})
        shared_items.remove_stagings(self.folders, self.held)
