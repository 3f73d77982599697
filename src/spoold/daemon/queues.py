"""One queue's bookkeeping: which items it tracks, which run, which wait for a retry, how many in each state.

`QueueBook` alone changes these; the main loop calls it, from its one thread. Work on files (claiming,
recovery, arrivals) happens in the modules that own it, which return what they found for the book to
record. Items run as jobs of reused worker threads; a new `concurrency` applies at the next dispatch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from spoold.daemon import arriving, claiming, recovery
from spoold.daemon.arriving import ArrivingItem
from spoold.daemon.config import Config, Queue
from spoold.daemon.gather import Gathering
from spoold.daemon.intake import CLAIMS_PER_TICK, Arrival, Intake
from spoold.daemon.layout import QueueFolders
from spoold.daemon.messages import Outcome
from spoold.daemon.retention import Pruner
from spoold.daemon.sidecar import ACTIVE_STATES, Sidecar
from spoold.daemon.tally import ItemStates, StopRecord, status_mtime_ns
from spoold.daemon.workers import Job
from spoold.fsio import now_iso

log = logging.getLogger("spoold")
# Waiting items whose documents stay in memory (the rest are read at dispatch), and waiting items at most:
# 256 of each held a 20,000-item burst 4 MiB higher at its peak and once idle, for no more items/s.
KEEP_LOADED, MAX_WAITING = 64, 64
StartWorker = Callable[["QueueBook", Sidecar, ArrivingItem | None], Job]
# (queue, outcome: done, failed or rejected, wall-clock time): the loop's metrics count items ending.
OnEnded = Callable[[str, str, float], None]


class QueueBook:
    def __init__(self, config: Config, queue: Queue, folders: QueueFolders) -> None:
        self.config = config
        self.queue = queue
        self.folders = folders
        self.intake = Intake(queue, folders.inbox)
        # Set when the daemon stops or the queue leaves the config: running steps checkpoint and end.
        self.stop_event = threading.Event()
        self.is_closed = False
        self.pending: deque[str] = deque()
        self.running: dict[str, Job] = {}
        self.retry_at: dict[str, float] = {}
        # Every tracked item with work left. Its document is kept only while it runs or arrives, or while few
        # wait (None: on disk, read at dispatch): a burst of 100,000 queued items must not hold 100,000 documents.
        self.sidecars: dict[str, Sidecar | None] = {}
        # Provisional items whose bundle is still being written into the inbox, by item name.
        self.arriving: dict[str, ArrivingItem] = {}
        self.states = ItemStates()
        self.sweep: recovery.StatusSweep | None = None
        # Before anything here writes a sidecar: a clean stop's counts hold only if nothing changed since.
        self._status_mtime_ns = status_mtime_ns(folders.status)
        self.last_error: dict[str, Any] | None = None
        # Members of a `gather:` queue wait there for their group instead of running the chain.
        self.gathering = Gathering(config, queue, folders)
        self.on_ended: OnEnded = lambda _queue, _outcome, _at: None  # a book nobody counts
        self.pruner = Pruner(folders, self.states.forget_finished, lambda: self.sweep is None)
        # One stop per running item: `stop` sets them all, `revoke` one (a shared queue's claim was lost).
        self._item_stops: dict[str, threading.Event] = {}
        self.revoked: set[str] = set()

    @property
    def name(self) -> str:
        return self.queue.name

    # ---- recording -----------------------------------------------------------------------------------------

    def set_state(self, item: str, state: str) -> None:
        self.states.set(item, state)

    def forget(self, item: str) -> None:
        self.states.drop(item)
        self.sidecars.pop(item, None)
        self.retry_at.pop(item, None)

    def track(self, sidecar: Sidecar, *, is_news: bool = True, is_counted: bool = True) -> None:
        """Record an item found or made on disk, and schedule it if it has work left.

        `is_news`: it changed state just now (not an old item found at start), so a failure is the last error.
        `is_counted`: a finished item is counted now (not when start-up finds it in work/: see `recover`).
        """
        name = sidecar.name
        self.states.requeued(name, sidecar.doc.pop("requeued_from", None) if is_news else None)
        self.states.set(name, sidecar.state, is_live=is_news, is_counted=is_counted)
        if sidecar.state not in ACTIVE_STATES:
            self.sidecars.pop(name, None)
            if sidecar.state == "failed" and is_news:
                self._note_error(sidecar)
            elif sidecar.state == "done" and is_news:
                self.on_ended(self.name, "done", time.time())
            return
        if name in self.running or self.is_closed:
            return
        self.sidecars[name] = sidecar if len(self.pending) < KEEP_LOADED or name in self.arriving else None
        if self.gathering.take(sidecar):
            return
        if sidecar.state == "retrying":
            at = sidecar.next_attempt_at() or time.time()
            self.retry_at[name] = time.monotonic() + max(0.0, at - time.time())
        elif name not in self.pending:
            self.pending.append(name)

    def track_found(self, found: list[recovery.Found], *, is_counted: bool) -> None:
        for item in found:
            if item.arriving is not None:
                self._track_arriving(item.sidecar, item.arriving)
            else:
                self.track(item.sidecar, is_news=False, is_counted=is_counted)

    def adopt(self, item: str) -> None:
        """A worker made a new item in work/ (a hand-over): load and schedule it."""
        if item in self.sidecars or item in self.running:
            return
        sidecar = Sidecar.load(self.folders.sidecar_path(item))
        if sidecar is not None:
            self.track(sidecar)

    def _note_error(self, sidecar: Sidecar) -> None:
        """A new failure (or rejection): the last error, and counted."""
        self.last_error = {"queue": self.name, "item": sidecar.name, **(sidecar.error or {}), "at": now_iso()}
        is_rejected = (sidecar.error or {}).get("type") == "rejected"
        self.on_ended(self.name, "rejected" if is_rejected else "failed", time.time())

    # ---- intake --------------------------------------------------------------------------------------------

    def recover(self, stop: StopRecord | None = None) -> None:
        """Resume the items in work/, and count the finished ones (tally's note says how)."""
        self.gathering = Gathering(self.config, self.queue, self.folders)  # rebuilt from the sidecars found
        found = recovery.recover(self.config, self.queue, self.folders, self.stop_event, self.running)
        unfinished = sum(1 for f in found if f.sidecar.state in ACTIVE_STATES)
        if self.sweep is not None:  # the queue came back to the config while its sweep ran
            self.sweep.close()
        is_sweeping = self.states.start_counting(stop, self._status_mtime_ns, unfinished)
        self.sweep = recovery.StatusSweep(self.queue, self.folders) if is_sweeping else None
        # Finished items still in work/ were counted before the stop, or the sweep counts them.
        self.track_found(found, is_counted=False)

    def sweep_step(self) -> None:
        if self.sweep is None:
            return
        found = self.sweep.step(lambda item: item in self.running or self.states.is_known(item))
        self.track_found(found or [], is_counted=True)
        # A group item whose end a kill cut short, finished by the sweep: its members, found waiting, end too.
        for member in [m for f in found or [] if f.is_cut_short for m in self.gathering.group_ended(f.sidecar)]:
            self.track(member)
        if found is None:
            self.sweep = None
            self.states.sweep_ended(self.name)

    def rescan(self, now: float) -> None:
        """The periodic look at everything: vanished arrivals, the inbox, work/ behind our back, retention."""
        self.check_still_there()
        self.scan_inbox(now)
        self.pick_up()

    def scan_inbox(self, now: float) -> None:
        # A shared queue's inbox is in the store: items reach work/ only through a claim (daemon/shared.py).
        if self.queue.shared is None:
            self.intake.scan(now)

    def pick_up(self) -> None:
        known = set(self.sidecars) | set(self.running)
        for sidecar in recovery.pick_up(self.config, self.queue, self.folders, known):
            self.track(sidecar)

    def take_arrivals(self, now: float) -> None:
        if self.queue.shared is not None:
            return
        claimed: list[Arrival] = []
        # Claimed items wait in work/ for a worker: beyond MAX_WAITING, a burst waits in the inbox instead.
        for arrival in self.intake.due(now, min(CLAIMS_PER_TICK, MAX_WAITING - len(self.pending))):
            try:
                if (sidecar := self._on_arrival(arrival)) is not None:
                    claimed.append(arrival)
                    self.track(sidecar)  # dispatched after this tick's commit, below
            except OSError as exc:
                # Whatever was claimed stays where it is (inbox, or work/ without a sidecar): a rescan retries.
                log.error("%s/%s: cannot claim: %s", self.name, arrival.entry, exc)
            except Exception:
                log.exception("%s/%s: internal error while claiming; a rescan tries again", self.name, arrival.entry)
        claiming.commit(self.folders, claimed)

    def _on_arrival(self, arrival: Arrival) -> Sidecar | None:
        """A folder to start early, the marker of one arriving, or a complete entry (claimed: its sidecar)."""
        if arrival.is_early:
            started = arriving.start(self.config, self.queue, self.folders, arrival.entry, self.stop_event)
            if started is not None:
                self._track_arriving(*started)
            return None
        # An abandoned item's folder was replaced: the marker belongs to the new folder, a new item.
        early = next((a for a in self.arriving.values() if a.entry == arrival.entry and not a.is_abandoned), None)
        if early is not None:
            self._complete(early)
            return None
        return claiming.claim(self.config, self.queue, self.folders, arrival)

    def on_event(self, parts: tuple[str, ...], is_landed: bool, now: float) -> None:
        """An inbox event at `parts` (relative to the inbox)."""
        self.intake.notice(self.folders.inbox.joinpath(*parts), now, is_landed)
        for item in self.arriving.values():
            if len(parts) > 1 and item.entry == parts[0]:
                item.touched("/".join(parts[1:]), is_landed)

    # ---- bundles still arriving ------------------------------------------------------------------------------

    def _track_arriving(self, sidecar: Sidecar, item: ArrivingItem) -> None:
        self.arriving[sidecar.name] = item
        self.intake.receiving.add(item.entry)
        self.track(sidecar)

    def _complete(self, item: ArrivingItem) -> None:
        """The ready marker arrived: move the folder into the item; settle it here unless a worker holds it."""
        limits = self.queue.spec.limits
        fields, rejection = arriving.read_marker(self.folders, item.entry, limits)
        if not arriving.move_in(self.folders, item):
            self._abandon(item)
            return
        rejection = rejection or arriving.moved_in_rejection(self.folders, item.item, limits)
        del self.arriving[item.item]
        self.intake.receiving.discard(item.entry)
        item.complete(fields, rejection)
        if item.item in self.running:
            return  # its runner settles the sidecar
        sidecar = self._sidecar(item.item)
        if sidecar is None:
            return  # its sidecar is gone (removed behind the daemon's back): nothing to settle
        arriving.settle(self.folders, sidecar, item.entry, fields)
        item.close()
        if rejection:
            claiming.reject(self.folders, sidecar, rejection)
            self.track(sidecar)

    def check_still_there(self) -> None:
        """Drop provisional items whose folder left the inbox (or was replaced) without a marker."""
        for item in list(self.arriving.values()):
            if arriving.is_still_there(self.folders, item) is False:
                self._abandon(item)

    def _abandon(self, item: ArrivingItem) -> None:
        item.abandon()
        if item.item not in self.running:
            self._discard(item)

    def _discard(self, item: ArrivingItem) -> None:
        """Remove every trace of a provisional item (the running step, if any, has ended)."""
        item.close()
        self.arriving.pop(item.item, None)
        self.intake.receiving.discard(item.entry)
        self.forget(item.item)
        if item.item in self.pending:
            self.pending.remove(item.item)
        arriving.drop_files(self.folders, item.item)

    # ---- running -------------------------------------------------------------------------------------------

    def release_due_retries(self, now: float) -> None:
        for item, at in list(self.retry_at.items()):
            if at <= now:
                del self.retry_at[item]
                self.pending.append(item)
        # Here, on the loop's tick, everything found or claimed is tracked: groups form and time out now.
        for sidecar in self.gathering.step(time.time(), set(self.running)):
            self.track(sidecar)

    def dispatch(self, start_worker: StartWorker) -> None:
        while self.pending and len(self.running) < self.queue.spec.concurrency and not self.is_closed:
            name = self.pending.popleft()
            if name not in self.sidecars or name in self.running:
                continue
            sidecar = self._sidecar(name)
            if sidecar is None or sidecar.state not in ACTIVE_STATES:
                self.forget(name)  # removed or finished behind the daemon's back: a rescan finds what is left
                continue
            self.running[name] = start_worker(self, sidecar, self.arriving.get(name))

    def _sidecar(self, name: str) -> Sidecar | None:
        """The item's sidecar, read from disk now if it was not kept in memory."""
        if (sidecar := self.sidecars.get(name)) is None and name in self.sidecars:
            sidecar = self.sidecars[name] = Sidecar.load(self.folders.sidecar_path(name))
        return sidecar

    def item_stop(self, item: str) -> threading.Event:
        """What stops one running item: set for all by `stop`, for one by `revoke`."""
        if (event := self._item_stops.get(item)) is None:
            event = self._item_stops[item] = threading.Event()
            if self.stop_event.is_set():
                event.set()
        return event

    def revoke(self, item: str) -> None:
        """This node no longer holds the shared item: stop it at its next checkpoint, then drop it here."""
        if item in self.running:
            self.revoked.add(item)
            self.item_stop(item).set()
        else:
            self._drop(item)

    def _drop(self, item: str) -> None:
        self.revoked.discard(item)
        self.forget(item)
        if item in self.pending:
            self.pending.remove(item)
        arriving.drop_files(self.folders, item)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folders.sidecar_path(item))

    def finished(self, item: str, outcome: Outcome) -> None:
        """A worker is done with `item` for now: record the outcome and move the item where it belongs."""
        self.running.pop(item, None)
        self._item_stops.pop(item, None)
        if item in self.revoked:
            log.info("%s/%s: stopped and dropped: another node holds it now", self.name, item)
            self._drop(item)
            return
        early = self.arriving.get(item)
        if early is not None and early.is_abandoned:
            self._discard(early)
            return
        sidecar = self.sidecars.get(item)
        if sidecar is None:
            return
        if sidecar.state in ACTIVE_STATES:
            self.set_state(item, sidecar.state)
        if outcome.verdict == "retry" and outcome.retry_at is not None and not self.is_closed:
            self.retry_at[item] = time.monotonic() + max(0.0, outcome.retry_at - time.time())
            if len(self.retry_at) > KEEP_LOADED:
                self.sidecars[item] = None  # read again when its retry is due
            return
        if outcome.verdict in ("done", "failed"):
            self.sidecars.pop(item, None)
            self.set_state(item, outcome.verdict)
            if outcome.verdict == "failed":
                self._note_error(sidecar)
            else:
                log.info("%s/%s: done", self.name, item)
                self.on_ended(self.name, "done", time.time())
            if (self.folders.work / item).exists():
                # The worker could not move it (or gave up without a sidecar write): the next rescan tries.
                recovery.settle_finished(self.queue, self.folders, sidecar, outcome.verdict)
            for member in self.gathering.group_ended(sidecar):
                self.track(member)
        elif self.is_closed:
            self.forget(item)  # interrupted or retrying: its sidecar resumes it when the queue comes back
        elif outcome.verdict == "interrupted" and not self.stop_event.is_set():
            self.pending.append(item)  # stopped by a removal of the queue that a reload has undone

    # ---- counts and time -----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return self.states.counts()

    def next_deadline(self, is_intake_paused: bool) -> float | None:
        if self.sweep is not None:
            return time.monotonic()  # the loop goes on sweeping, a slice per tick, between its messages
        deadlines = list(self.retry_at.values())
        if (at := self.gathering.next_deadline()) is not None:
            deadlines.append(time.monotonic() + max(0.0, at - time.time()))
        # While intake is paused (or MAX_WAITING wait), due arrivals wait for the disk check (or a worker).
        if not is_intake_paused and len(self.pending) < MAX_WAITING and (at := self.intake.next_deadline()) is not None:
            deadlines.append(at)
        return min(deadlines, default=None)

    # ---- config changes ------------------------------------------------------------------------------------

    def reconfigure(self, config: Config, queue: Queue) -> None:
        self.config = config
        self.queue = queue
        self.intake.reconfigure(queue)
        self.pending.extend(self.gathering.reconfigure(config, queue))  # members that now run alone
        if self.is_closed:
            # Back in the config before its last items stopped: serve it again.
            self.is_closed = False
            self.stop_event = threading.Event()
            self.recover()

    def stop(self) -> None:
        """Running steps checkpoint and end (the daemon is stopping)."""
        self.stop_event.set()
        for event in self._item_stops.values():
            event.set()
        for item in self.arriving.values():
            item.wake()

    def close(self) -> None:
        """The queue left the config: stop taking work; running steps checkpoint; everything stays on disk."""
        self.is_closed = True
        self.stop()
        self.pending.clear()
        self.retry_at.clear()
        for item in [n for n in self.states if n not in self.running]:
            self.forget(item)
