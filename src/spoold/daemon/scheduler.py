"""The daemon: one loop that claims, schedules and supervises; workers run chains.

Phases: start (layout, recovery, watches, first scan, READY), loop (sleep until
an event or the next timer, then act), stop (checkpoint running steps, then
exit). Signal handlers, watchdog callbacks and workers only post messages to
the loop; every decision happens here, in one thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue as queue_module
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from spoold.daemon import arriving, recovery
from spoold.daemon.arriving import ArrivingItem
from spoold.daemon.config import Config, Queue, load_config
from spoold.daemon.handoff import hand_over
from spoold.daemon.health import NodeStatus, write_health
from spoold.daemon.intake import Intake
from spoold.daemon.layout import QueueFolders, SpoolLayout
from spoold.daemon.retention import prune
from spoold.daemon.runner import ItemRunner, Outcome
from spoold.daemon.sidecar import Sidecar, now_iso, parse_iso
from spoold.daemon.systemd import Notifier
from spoold.daemon.watcher import InboxWatcher
from spoold.errors import ConfigError, PermanentError
from spoold.transports import TransportPool

log = logging.getLogger("spoold")

HEALTH_INTERVAL_SECONDS = 5.0
DISK_CHECK_INTERVAL_SECONDS = 5.0
EXIT_OK = 0
EXIT_FORCED = 1


@dataclasses.dataclass
class QueueState:
    queue: Queue
    folders: QueueFolders
    intake: Intake
    executor: ThreadPoolExecutor
    pending: deque[str] = dataclasses.field(default_factory=deque)
    running: set[str] = dataclasses.field(default_factory=set)
    retry_at: dict[str, float] = dataclasses.field(default_factory=dict)
    sidecars: dict[str, Sidecar] = dataclasses.field(default_factory=dict)
    # Provisional items whose bundle is still being written into the inbox, by item name.
    arriving: dict[str, ArrivingItem] = dataclasses.field(default_factory=dict)


class Daemon:
    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.layout = SpoolLayout(config.spool, config.queues, config.group)
        self.messages: queue_module.SimpleQueue[tuple[Any, ...]] = queue_module.SimpleQueue()
        self.stop_event = threading.Event()
        self.transports = TransportPool()
        self.notifier = Notifier()
        self.watcher = InboxWatcher(lambda p, is_landed: self.messages.put(("path", p, is_landed)),
                                    lambda: self.messages.put(("rescan",)))  # fmt: skip
        self.queues: dict[str, QueueState] = {}
        self.states: dict[tuple[str, str], str] = {}
        self._states_lock = threading.Lock()
        self.started = now_iso()
        self.is_ready = False
        self.is_intake_paused = False
        self.free_bytes = 0
        self.last_error: dict[str, Any] | None = None
        self._term_count = 0
        self._is_status_stale = True
        self._next = {"health": 0.0, "disk": 0.0, "rescan": 0.0, "watchdog": 0.0}

    # ---- start -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.layout.ensure()
        self._check_disk()
        for name, queue in self.config.queues.items():
            self._add_queue(name, queue)
        for state in self.queues.values():
            recovery.recover(self, state)
        self.watcher.start()
        now = time.monotonic()
        for state in self.queues.values():
            state.intake.scan(now)
        self._install_signal_handlers()
        self.is_ready = True
        self._tick(time.monotonic())
        self.notifier.ready()
        log.info("spoold started: spool %s, queues %s, config %s", self.config.spool.resolve(),
                 ", ".join(self.queues), self.config.source)  # fmt: skip

    def _add_queue(self, name: str, queue: Queue) -> None:
        folders = self.layout.queues[name]
        executor = ThreadPoolExecutor(max_workers=queue.spec.concurrency, thread_name_prefix=f"q-{name}")
        state = QueueState(queue, folders, Intake(queue, folders.inbox), executor)
        self.queues[name] = state
        # Settling watches inside bundles; so does a first step that reads frames while they land.
        recursive = queue.spec.items == "bundles" and (queue.spec.ready == "settle" or queue.starts_early)
        self.watcher.watch(folders.inbox, recursive=recursive)

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, lambda n, _frame: self.messages.put(("signal", n)))

    # ---- loop --------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit code."""
        self.start()
        try:
            while True:
                timeout = max(0.0, self._next_wakeup() - time.monotonic())
                try:
                    message = self.messages.get(timeout=timeout)
                except queue_module.Empty:
                    message = None
                while message is not None:
                    if self._handle(message) == "force":
                        return EXIT_FORCED
                    try:
                        message = self.messages.get_nowait()
                    except queue_module.Empty:
                        message = None
                self._tick(time.monotonic())
                if self.stop_event.is_set() and not any(s.running for s in self.queues.values()):
                    return EXIT_OK
        finally:
            self._shutdown()

    def _handle(self, message: tuple[Any, ...]) -> str | None:
        kind = message[0]
        now = time.monotonic()
        if kind == "path":
            path: Path = message[1]
            for state in self.queues.values():
                if path.is_relative_to(state.folders.inbox):
                    state.intake.notice(path, now)
                    if state.arriving:
                        arriving.on_event(state, path.relative_to(state.folders.inbox).parts, message[2])
        elif kind == "rescan":
            log.warning("inotify events were lost; rescanning every inbox")
            self._next["rescan"] = 0.0
        elif kind == "finished":
            self._finished(message[1], message[2], message[3])
        elif kind == "adopt":
            target = self.queues.get(message[1])
            if target is not None:
                self._schedule_existing(target, message[2])
        elif kind == "signal":
            return self._on_signal(message[1])
        return None

    def _on_signal(self, signum: int) -> str | None:
        if signum == signal.SIGHUP:
            self.reload()
            return None
        if signum == signal.SIGUSR1:
            # `spoold retry` moved items back into work/.
            for state in self.queues.values():
                recovery.pick_up(self, state)
            return None
        self._term_count += 1
        if self._term_count > 1:
            log.warning("second stop request: stopping now")
            return "force"
        log.info("stopping: checkpointing running steps")
        self.notifier.stopping()
        self.stop_event.set()
        for state in self.queues.values():
            for item in state.arriving.values():
                item.wake()
        return None

    def _next_wakeup(self) -> float:
        deadlines = list(self._next.values())
        if self.stop_event.is_set():
            return min(deadlines)
        for state in self.queues.values():
            deadline = state.intake.next_deadline()
            # While intake is paused, due arrivals wait for the disk check, not for a spinning loop.
            if deadline is not None and not self.is_intake_paused:
                deadlines.append(deadline)
            deadlines.extend(state.retry_at.values())
        return min(deadlines)

    def _tick(self, now: float) -> None:
        if now >= self._next["disk"]:
            self._check_disk()
            self._next["disk"] = now + DISK_CHECK_INTERVAL_SECONDS
        if now >= self._next["rescan"]:
            for state in self.queues.values():
                arriving.check_still_there(self, state)
                state.intake.scan(now)
                recovery.pick_up(self, state)
                prune(state.queue, state.folders, self._forget)
            self._next["rescan"] = now + self.config.rescan_seconds
        if not self.stop_event.is_set():
            for state in self.queues.values():
                if not self.is_intake_paused:
                    for arrival in state.intake.due(now):
                        arriving.on_arrival(self, state, arrival)
                for item, at in list(state.retry_at.items()):
                    if at <= now:
                        del state.retry_at[item]
                        state.pending.append(item)
                self._dispatch(state)
        if now >= self._next["watchdog"]:
            self.notifier.watchdog()
            interval = self.notifier.watchdog_interval_seconds or 30.0
            self._next["watchdog"] = now + interval
        if now >= self._next["health"]:
            self._write_health()
            self._next["health"] = now + HEALTH_INTERVAL_SECONDS
        elif self._is_status_stale:
            self._is_status_stale = False
            self.notifier.status(self.node_status().status_line())

    # ---- intake ------------------------------------------------------------------------------------------------

    def _schedule_existing(self, state: QueueState, name: str) -> None:
        sidecar = Sidecar.load(state.folders.sidecar_path(name))
        if sidecar is None:
            return
        state.sidecars[name] = sidecar
        self._set_state(state.queue.name, name, sidecar.state)
        if sidecar.state == "retrying":
            at = parse_iso(sidecar.doc.get("next_attempt_at")) or time.time()
            state.retry_at[name] = time.monotonic() + max(0.0, at - time.time())
        elif sidecar.state in ("queued", "running", "waiting"):
            state.pending.append(name)

    # ---- running -----------------------------------------------------------------------------------------------

    def _dispatch(self, state: QueueState) -> None:
        while state.pending and len(state.running) < state.queue.spec.concurrency:
            name = state.pending.popleft()
            sidecar = state.sidecars.get(name)
            if sidecar is None or name in state.running:
                continue
            runner = ItemRunner(
                self.config, state.queue, state.folders, sidecar, transports=self.transports,
                stop_event=self.stop_event, on_state=self._set_state, hand_over=self._hand_over,
                free_bytes=self.layout.free_bytes, arriving=state.arriving.get(name),
            )  # fmt: skip
            state.running.add(name)
            state.executor.submit(self._work, runner)

    def _work(self, runner: ItemRunner) -> None:
        try:
            outcome = runner.run()
        except Exception:  # a bug in the runner itself: keep the item, report, try again later
            log.exception("%s/%s: internal error", runner.queue.name, runner.sidecar.name)
            outcome = Outcome("retry", retry_at=time.time() + 60)
        self.messages.put(("finished", runner.queue.name, runner.sidecar.name, outcome))

    def _finished(self, queue_name: str, name: str, outcome: Outcome) -> None:
        state = self.queues[queue_name]
        state.running.discard(name)
        early = state.arriving.get(name)
        if early is not None and early.is_abandoned:
            arriving.discard(self, state, early)
            return
        sidecar = state.sidecars[name]
        if outcome.verdict == "done":
            recovery.settle_finished(state.queue, state.folders, sidecar)
            del state.sidecars[name]
            log.info("%s/%s: done", queue_name, name)
        elif outcome.verdict == "failed":
            state.folders.finish(name, "failed")
            del state.sidecars[name]
            self.last_error = {"queue": queue_name, "item": name, **(sidecar.doc.get("error") or {}), "at": now_iso()}
        elif outcome.verdict == "retry" and outcome.retry_at is not None:
            state.retry_at[name] = time.monotonic() + max(0.0, outcome.retry_at - time.time())
        self._set_state(queue_name, name, sidecar.state)

    def _hand_over(self, runner: ItemRunner, queue: str, ctx: Any, paths: list[Path], fields: Any,
                   name: str | None) -> str:  # fmt: skip
        target = self.queues.get(queue)
        if target is None:
            raise PermanentError(f"no local queue named {queue!r}")
        new_name = hand_over(self.config, runner, target.queue, target.folders, ctx, paths, fields, name)
        self.messages.put(("adopt", queue, new_name))
        return new_name

    # ---- state, disk, health -----------------------------------------------------------------------------------

    def _set_state(self, queue: str, item: str, state: str) -> None:
        with self._states_lock:
            self.states[(queue, item)] = state
            self._is_status_stale = True

    def _forget(self, queue: str, item: str) -> None:
        with self._states_lock:
            self.states.pop((queue, item), None)

    def counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {name: {} for name in self.queues}
        with self._states_lock:
            for (queue, _), state in self.states.items():
                if queue in counts:
                    counts[queue][state] = counts[queue].get(state, 0) + 1
        return counts

    def _check_disk(self) -> None:
        try:
            self.free_bytes = self.layout.free_bytes()
        except OSError:
            return
        should_pause = self.free_bytes < self.config.min_free_bytes
        if should_pause != self.is_intake_paused:
            self.is_intake_paused = should_pause
            if should_pause:
                log.warning("free space %d bytes is below min_free %d: intake paused", self.free_bytes,
                            self.config.min_free_bytes)  # fmt: skip
            else:
                log.info("free space is back above min_free: intake resumed")
            self._next["health"] = 0.0

    def node_status(self) -> NodeStatus:
        return NodeStatus(self.started, self.counts(), self.free_bytes, self.config.min_free_bytes,
                          self.is_intake_paused, self.is_ready, self.last_error, self.config.spool)  # fmt: skip

    def _write_health(self) -> None:
        status = self.node_status()
        try:
            write_health(status, self.layout.health_path, self.layout.metrics_path)
        except OSError as exc:
            log.error("cannot write health.json: %s", exc)
        self.notifier.status(status.status_line())

    # ---- reload and stop ---------------------------------------------------------------------------------------

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            if new.spool.resolve() != self.config.spool.resolve():
                raise ConfigError("the spool folder cannot change on reload; restart spoold", file=new.source)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc.describe())
            self.notifier.ready()
            return
        self.config = new
        self.layout = SpoolLayout(new.spool, new.queues, new.group)
        self.layout.ensure()
        for name, queue in new.queues.items():
            if name in self.queues:
                state = self.queues[name]
                state.queue = queue
                state.intake.queue = queue
                state.intake.settle_seconds = float(queue.spec.settle)
                self.layout.queues[name] = state.folders
            else:
                self._add_queue(name, queue)
                recovery.recover(self, self.queues[name])
                self.queues[name].intake.scan(time.monotonic())
        for name in [n for n in self.queues if n not in new.queues]:
            log.warning("queue %s was removed from the config; its items stay on disk", name)
            self.queues[name].executor.shutdown(wait=False)
            del self.queues[name]
        log.info("config reloaded from %s", new.source)
        self.notifier.ready()

    def _shutdown(self) -> None:
        self.stop_event.set()
        with contextlib.suppress(Exception):
            self.watcher.stop()
        for state in self.queues.values():
            state.executor.shutdown(wait=self._term_count <= 1)
        self.transports.close()
        self.is_ready = False
        with contextlib.suppress(OSError):
            self._write_health()
        self.notifier.close()
        log.info("spoold stopped")

