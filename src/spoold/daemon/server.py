"""The daemon's lifecycle: start up, the main loop, shut down; signals, timers, disk, health, reload.

One thread decides everything: signal handlers, the inbox watcher and workers
only post `messages` to it. Each message and each timer runs behind a wall:
an exception is logged with its queue and item and the loop goes on, so no
single item, folder or bug can end the daemon.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue as queue_module
import signal
import time
from pathlib import Path

from spoold.daemon import memory
from spoold.daemon.arriving import ArrivingItem
from spoold.daemon.config import Config, Queue, load_config, reload_problem
from spoold.daemon.health import NodeStatus, live_counts, write_health
from spoold.daemon.layout import IntakeGate, SpoolLayout
from spoold.daemon.logs import about
from spoold.daemon.messages import (
    ClaimLost,
    EventsLost,
    ItemAdopted,
    ItemFinished,
    Message,
    PathEvent,
    SignalReceived,
    StateChanged,
    StepEnded,
)
from spoold.daemon.metrics import Metrics
from spoold.daemon.queues import QueueBook
from spoold.daemon.retention import WallClock
from spoold.daemon.runner import ItemRunner
from spoold.daemon.shared import SharedQueue
from spoold.daemon.sidecar import Sidecar
from spoold.daemon.systemd import Notifier
from spoold.daemon.tally import read_stop_records, stop_record
from spoold.daemon.walls import about_message, describe, guarded, log_failure
from spoold.daemon.watcher import InboxWatcher
from spoold.daemon.workers import Job, Workers
from spoold.errors import ConfigError
from spoold.fsio import now_iso
from spoold.transports import TransportPool

log = logging.getLogger("spoold")

HEALTH_INTERVAL_SECONDS = 5.0
# statvfs is cheap; at 5 s a producer writing a few MiB/s ran a 64 MiB disk from above min_free to full
# between two checks, so the pause came too late to be written to health.json (torture: disk/full).
DISK_CHECK_INTERVAL_SECONDS = 1.0
WATCHDOG_FALLBACK_SECONDS = 30.0
EXIT_OK = 0
EXIT_FORCED = 1


class Server:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config, self.config_path = config, config_path
        self.layout = SpoolLayout(config.spool, config.queues, config.group)
        self.messages: queue_module.SimpleQueue[Message] = queue_module.SimpleQueue()
        self.is_stopping = False
        self.transports = TransportPool()
        self.workers = Workers()
        self.notifier = Notifier()
        self.watcher = InboxWatcher(lambda path, is_landed: self.messages.put(PathEvent(path, is_landed)),
                                    lambda: self.messages.put(EventsLost()))  # fmt: skip
        self.books: dict[str, QueueBook] = {}
        # The queues whose inbox is an S3 prefix shared with other nodes, by queue name.
        self.shared: dict[str, SharedQueue] = {}
        self.metrics = Metrics()
        self.clock = WallClock()  # the wall clock's steps, for retention
        # Queues removed from the config whose items still run; they finish or checkpoint, then go.
        self.retiring: dict[str, QueueBook] = {}
        self.started = now_iso()
        self.is_ready = False
        self.intake_gate = IntakeGate()
        self._term_count = 0
        self._next = {"health": 0.0, "disk": 0.0, "rescan": 0.0, "watchdog": 0.0}

    def run(self) -> int:
        """Run until stopped; return the exit code."""
        self.start_up()
        try:
            return self.main_loop()
        finally:
            self.shut_down()

    # ---- start up ----------------------------------------------------------------------------------------------

    def start_up(self) -> None:
        memory.limit_arenas()  # before any thread starts
        self.layout.ensure()
        guarded("tightening claimed items' folders", self.layout.tighten_items)
        guarded("removing stale temp files", self.layout.remove_stale_temps)
        self._check_disk()
        for name, queue in self.config.queues.items():
            self._watch(self._add_book(name, queue))
        for queue in self.config.queues.values():
            if queue.shared is not None:
                # Before recovery: only the items whose claims this node still holds may run.
                self._start_shared(queue)
        stops = read_stop_records(self.layout.health_path)
        for book in self.books.values():
            guarded(f"recovering queue {book.name}", functools.partial(book.recover, stops.get(book.name)))
        self.watcher.start()
        now = time.monotonic()
        for book in self.books.values():
            book.scan_inbox(now)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, lambda number, _frame: self.messages.put(SignalReceived(number)))
        # Intake takes a read lease for an instant to tell a file still open for writing; a producer opening
        # it in that instant makes the kernel send SIGIO, whose default action would end the daemon.
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        self.is_ready = True
        self._tick(time.monotonic())
        self.notifier.ready()
        log.info("spoold started: spool %s, queues %s, config %s", self.config.spool.resolve(),
                 ", ".join(self.books), self.config.source)  # fmt: skip

    def _add_book(self, name: str, queue: Queue) -> QueueBook:
        book = QueueBook(self.config, queue, self.layout.queues[name])
        book.on_ended = self.metrics.item_ended
        self.metrics.declare(queue)
        self.books[name] = book
        return book

    def _start_shared(self, queue: Queue) -> None:
        agent = SharedQueue(self.config, queue, self.layout.queues[queue.name], self.messages.put,
                            lambda: not (self.intake_gate.is_paused or self.is_stopping))  # fmt: skip
        agent.start_up()
        self.shared[queue.name] = agent

    def _watch(self, book: QueueBook) -> None:
        if book.queue.shared is not None:
            return  # its inbox is in the store
        spec = book.queue.spec
        # A first step that reads frames while they land needs events from inside the bundle. Settling needs
        # only to see the folder appear: intake compares the whole tree's signature every settle period, and
        # a recursive watch would make the watcher walk whatever tree a producer drops (1,000 levels deep).
        self.watcher.watch(book.folders.inbox, recursive=book.queue.starts_early,
                           creates=spec.items == "bundles" and spec.ready == "settle")  # fmt: skip

    # ---- main loop ---------------------------------------------------------------------------------------------

    def main_loop(self) -> int:
        while True:
            timeout = max(0.0, self._next_wakeup() - time.monotonic())
            try:
                message: Message | None = self.messages.get(timeout=timeout)
            except queue_module.Empty:
                message = None
            while message is not None:
                if self._handle(message):
                    return EXIT_FORCED
                try:
                    message = self.messages.get_nowait()
                except queue_module.Empty:
                    message = None
            self._tick(time.monotonic())
            if self.is_stopping and not any(b.running for b in self._all_books()):
                return EXIT_OK

    def _handle(self, message: Message) -> bool:
        """Act on one message behind the wall; True when the daemon must stop at once."""
        try:
            with about_message(message):
                return self._act(message)
        except Exception as exc:  # noqa: BLE001 - the wall: one message's trouble never ends the daemon
            log_failure(f"handling {describe(message)}", exc)
            return False

    def _act(self, message: Message) -> bool:
        match message:
            case PathEvent(path, is_landed):
                now = time.monotonic()
                for book in self.books.values():
                    if path.is_relative_to(book.folders.inbox) and path != book.folders.inbox:
                        book.on_event(path.relative_to(book.folders.inbox).parts, is_landed, now)
            case EventsLost():
                log.warning("inotify events were lost; rescanning every inbox")
                self._next["rescan"] = 0.0
            case StateChanged(queue, item, state):
                holder = self._book(queue)
                if holder is not None and item in holder.running:
                    holder.set_state(item, state)
            case StepEnded():
                self.metrics.step_ended(message)
            case ItemFinished():
                self._item_finished(message)
            case ItemAdopted(queue, item):
                if (target := self.books.get(queue)) is not None:
                    target.adopt(item)
            case ClaimLost(queue, item):
                if (holder := self._book(queue)) is not None:
                    holder.revoke(item)
            case SignalReceived(signum):
                return self._on_signal(signum)
        return False

    def _item_finished(self, message: ItemFinished) -> None:
        holder = self._book(message.queue)
        if holder is None:
            return
        holder.finished(message.item, message.outcome)
        self._retire_if_idle(holder)
        if (agent := self.shared.get(message.queue)) is not None:
            agent.item_finished(message.item, Sidecar.load(holder.folders.sidecar_path(message.item)))

    def _on_signal(self, signum: int) -> bool:
        if signum == signal.SIGHUP:
            self.reload()
            return False
        if signum == signal.SIGUSR1:
            # `spoold retry` moved items back into work/.
            for book in self.books.values():
                guarded(f"picking up items of queue {book.name}", book.pick_up)
            for agent in self.shared.values():
                agent.poll_now()
            return False
        self._term_count += 1
        if self._term_count > 1:
            log.warning("second stop request: stopping now")
            return True
        log.info("stopping: checkpointing running steps")
        self.notifier.stopping()
        self.is_stopping = True
        for book in self._all_books():
            book.stop()
        return False

    def _next_wakeup(self) -> float:
        deadlines = list(self._next.values())
        if not self.is_stopping:
            for book in self.books.values():
                if (deadline := book.next_deadline(self.intake_gate.is_paused)) is not None:
                    deadlines.append(deadline)
        deadlines += [d for agent in self.shared.values() if (d := agent.next_deadline()) is not None]
        return min(deadlines)

    def _tick(self, now: float) -> None:
        self.clock.sample()
        if now >= self._next["disk"]:
            self._next["disk"] = now + DISK_CHECK_INTERVAL_SECONDS
            guarded("checking free space", self._check_disk)
        if now >= self._next["rescan"]:
            self._next["rescan"] = now + self.config.rescan_seconds
            guarded("checking the spool's folders", self.layout.ensure)
            for book in self.books.values():
                # An inbox a producer removed is watched again (made again by `ensure`) before the rescan.
                guarded(f"watching queue {book.name}", functools.partial(self._watch, book))
            for book in self.books.values():
                with about(book.name):
                    guarded(f"rescanning queue {book.name}", functools.partial(book.rescan, now))
                    guarded(f"pruning queue {book.name}", functools.partial(book.pruner.prune, book.queue,
                                                                            self.clock))  # fmt: skip
        for name, agent in self.shared.items():
            if (holder := self._book(name)) is not None:
                for item in agent.expire(now):
                    holder.revoke(item)
        if not self.is_stopping:
            for book in self.books.values():
                with about(book.name):
                    guarded(f"scheduling queue {book.name}", functools.partial(self._schedule, book, now))
        if now >= self._next["watchdog"]:
            self.notifier.watchdog()
            self._next["watchdog"] = now + (self.notifier.watchdog_interval_seconds or WATCHDOG_FALLBACK_SECONDS)
        if now >= self._next["health"]:
            self._next["health"] = now + HEALTH_INTERVAL_SECONDS
            guarded("writing health.json", self._write_health)
            if not any(b.running or b.pending for b in self.books.values()):
                memory.give_back()
        else:
            self.notifier.status(self.node_status().status_line())

    def _schedule(self, book: QueueBook, now: float) -> None:
        if not self.intake_gate.is_paused:
            book.take_arrivals(now)
        book.release_due_retries(now)
        book.dispatch(self._start_worker)
        book.sweep_step()

    def _start_worker(self, book: QueueBook, sidecar: Sidecar, arriving: ArrivingItem | None) -> Job:
        runner = ItemRunner(self.config, self.layout, book.queue, sidecar, transports=self.transports,
                            stop_event=book.item_stop(sidecar.name), post=self.messages.put, arriving=arriving)
        return self.workers.start(f"{book.name}/{sidecar.name}", runner.run_and_report)

    # ---- books -------------------------------------------------------------------------------------------------

    def _all_books(self) -> list[QueueBook]:  # serving, and removed from the config but still running
        return [*self.books.values(), *self.retiring.values()]

    def _book(self, name: str) -> QueueBook | None:
        return self.books.get(name) or self.retiring.get(name)

    def _retire_if_idle(self, book: QueueBook) -> None:
        if book.is_closed and not book.running and self.retiring.get(book.name) is book:
            del self.retiring[book.name]
            log.info("queue %s: its last running item has stopped", book.name)

    # ---- disk and health ---------------------------------------------------------------------------------------

    def _check_disk(self) -> None:
        if self.intake_gate.check(self.layout, self.config.min_free_bytes):
            self._next["health"] = 0.0

    def node_status(self, *, is_stopped: bool = False) -> NodeStatus:
        errors = [b.last_error for b in self.books.values() if b.last_error]
        last_error = max(errors, key=lambda e: str(e.get("at", "")), default=None)
        return NodeStatus(self.started, {n: live_counts(b) for n, b in self.books.items()},
                          self.intake_gate.free_bytes, self.config.min_free_bytes, self.intake_gate.is_paused,
                          self.is_ready, last_error, self.config.spool, self.intake_gate.reason,
                          {name: agent.snapshot() for name, agent in self.shared.items()},
                          stop_record({n: b.folders.status for n, b in self.books.items() if b.sweep is None})
                          if is_stopped else None)  # fmt: skip

    def _write_health(self, *, is_stopped: bool = False) -> None:
        status = self.node_status(is_stopped=is_stopped)
        try:
            write_health(status, self.layout.health_path, self.layout.metrics_path, self.metrics)
        except OSError as exc:
            log.error("cannot write health.json: %s", exc)
        self.notifier.status(status.status_line())

    # ---- reload and shut down ----------------------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            if (problem := reload_problem(self.config, new)) is not None:
                raise ConfigError(problem, file=new.source)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc.describe())
            self.notifier.ready()
            return
        self.config = new
        self.layout = SpoolLayout(new.spool, new.queues, new.group)
        for name, book in [*self.books.items(), *self.retiring.items()]:
            if name in new.queues:
                self.layout.queues[name] = book.folders  # one folder object per queue: its claim lock
        guarded("creating the spool's folders", self.layout.ensure)
        now = time.monotonic()
        for name, queue in new.queues.items():
            self.metrics.declare(queue)
            if name in self.shared:
                self.shared[name].reconfigure(new, queue)
            if name in self.books:
                self.books[name].reconfigure(new, queue)
            elif name in self.retiring:
                book = self.books[name] = self.retiring.pop(name)
                guarded(f"watching queue {name}", functools.partial(self._watch, book))
                guarded(f"reopening queue {name}", functools.partial(book.reconfigure, new, queue))
            else:
                book = self._add_book(name, queue)
                guarded(f"watching queue {name}", functools.partial(self._watch, book))
                guarded(f"recovering queue {name}", book.recover)
                if queue.shared is not None:
                    guarded(f"sharing queue {name}", functools.partial(self._start_shared, queue))
                guarded(f"scanning queue {name}", functools.partial(book.scan_inbox, now))
        for name in [n for n in self.books if n not in new.queues]:
            log.warning("queue %s was removed from the config; its items stay on disk", name)
            book = self.books.pop(name)
            book.close()
            if (agent := self.shared.pop(name, None)) is not None:
                agent.stop()
            guarded(f"unwatching queue {name}", functools.partial(self.watcher.unwatch, book.folders.inbox))
            if book.running:
                self.retiring[name] = book
        log.info("config reloaded from %s", new.source)
        self.notifier.ready()

    def shut_down(self) -> None:
        self.is_stopping = True
        for book in self._all_books():
            book.stop()
        with contextlib.suppress(Exception):
            self.watcher.stop()
        if self._term_count <= 1:
            for book in self._all_books():
                for job in list(book.running.values()):
                    job.join()
            with contextlib.suppress(queue_module.Empty):  # workers that ended after the loop's last look
                while message := self.messages.get_nowait():  # a shared item's end is its agent's, which stops
                    if isinstance(message, ItemFinished) and message.queue not in self.shared:
                        guarded("recording a finished item", functools.partial(self._item_finished, message))
        for agent in self.shared.values():
            agent.stop()
        self.transports.close()
        self.is_ready = False
        # Every worker ended: the counts and the status folders' mtimes can be recorded as they stand.
        is_clean = not any(t.is_alive() for b in self._all_books() for t in b.running.values())
        guarded("writing health.json", functools.partial(self._write_health, is_stopped=is_clean))
        self.notifier.close()
        log.info("spoold stopped")
