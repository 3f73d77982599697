"""Inbox watching with watchdog's inotify backend.

Callbacks only enqueue a path; every decision happens in the main loop (`server`). Only
close-after-write and move events are subscribed to: with watchdog's default
mask the kernel queue overflowed (16,384 events) from about 50k files/s.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD, Mask

log = logging.getLogger(__name__)

# watchdog reports a move from outside the watched tree as a created event, so created events
# must pass the filter; the kernel mask below keeps plain IN_CREATE out of non-recursive watches.
# DirDeletedEvent: the watched inbox itself went (IN_DELETE_SELF); watchdog then stops that watch for good.
EVENT_FILTER: list[type[FileSystemEvent]] = [FileClosedEvent, FileMovedEvent, DirMovedEvent, FileCreatedEvent,
                                             DirCreatedEvent, DirDeletedEvent]  # fmt: skip
_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
# watchdog warns, with the whole watch table in the message, whenever a recursive watch re-adds a folder it
# already watches (a bundle renamed within the inbox): harmless, and megabytes of log for a deep tree.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


class _WithCreates(FileSystemEvent):
    """Never raised: its presence in a watch's event filter asks the kernel for IN_CREATE too."""


class _CompletionEmitter(InotifyEmitter):
    """Subscribes the kernel to close-after-write and moves only (plus creates where a watch needs them)."""

    def get_event_mask_from_filter(self) -> Mask:
        # IN_MOVED_TO only: each claim renames an entry out of the inbox, and watchdog holds an unpaired
        # IN_MOVED_FROM for 0.5 s at the head of its queue, which delayed every later arrival by up to 0.5 s.
        mask = InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_DELETE_SELF
        if self.watch.is_recursive or (self._event_filter and _WithCreates in self._event_filter):
            mask |= InotifyConstants.IN_CREATE
        return Mask(mask)


class _GuardedInotifyFD(InotifyFD):
    """watchdog walks a folder moved into a recursive watch with os.walk, which recurses: a producer's
    1,000-level folder raised RecursionError in the one thread that reads every inbox's events, and
    every inbox went deaf. Such an error now costs that event; a rescan finds what it missed."""

    on_lost: Callable[[], None] = staticmethod(lambda: None)

    def handle_event(self, event: InotifyEvent) -> None:
        try:
            super().handle_event(event)
        except (RecursionError, OSError) as exc:
            log.error("an inbox event could not be followed (%s); rescanning", type(exc).__name__)
            self.on_lost()


class _CompletionObserver(BaseObserver):
    def __init__(self) -> None:
        self._inotify_fd = _GuardedInotifyFD()
        self._inotify_fd.start()
        super().__init__(_CompletionEmitter, inotify_fd=self._inotify_fd)

    @property
    def inotify_fd(self) -> _GuardedInotifyFD:
        return self._inotify_fd

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()


class _Forwarder(FileSystemEventHandler):
    def __init__(self, notify: Callable[[Path, bool], None], on_gone: Callable[[Path], None]) -> None:
        self.notify = notify
        self.on_gone = on_gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirDeletedEvent):
            self.on_gone(Path(os.fsdecode(event.src_path)))
            return
        path = event.dest_path if isinstance(event, (FileMovedEvent, DirMovedEvent)) else event.src_path
        # A created event may be a file still being written (or one moved in from outside the tree): not landed.
        is_landed = isinstance(event, (FileClosedEvent, FileMovedEvent))
        self.notify(Path(os.fsdecode(path)), is_landed)


class _OverflowDetector(logging.Handler):
    """watchdog reports a kernel queue overflow only as a log warning; turn it into a rescan."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class InboxWatcher:
    """Watches inbox folders; `notify(path, is_landed)` for each relevant event, `on_overflow()` when events were lost.

    `is_landed`: the file at `path` was closed after writing or moved in, so it is complete.
    """

    def __init__(self, notify: Callable[[Path, bool], None], on_overflow: Callable[[], None]) -> None:
        self._observer = _CompletionObserver()
        self._observer.inotify_fd.on_lost = on_overflow
        self._forwarder = _Forwarder(notify, self._gone)
        self._overflow = _OverflowDetector(on_overflow)
        self._on_lost = on_overflow
        self._watches: dict[Path, ObservedWatch] = {}
        self._dead: set[Path] = set()  # inboxes removed while watched: watched again by the next `watch`
        self._lock = threading.Lock()

    def _gone(self, path: Path) -> None:
        """A watched inbox was removed (a producer's `rm -rf`): its watch is dead; rescan (which recreates
        the folder and watches it again) at once."""
        with self._lock:
            if path not in self._watches:
                return
            self._dead.add(path)
        log.warning("inbox %s was removed; it is made and watched again", path)
        self._on_lost()

    def watch(self, inbox: Path, *, recursive: bool = False, creates: bool = False) -> None:
        """Watch `inbox` (again, if it was removed since); `creates` also reports entries created in it (a
        folder a producer fills in place)."""
        with self._lock:
            if inbox in self._watches and inbox not in self._dead:
                return
        if inbox in self._watches:
            self.unwatch(inbox)
        event_filter = [*EVENT_FILTER, _WithCreates] if creates else EVENT_FILTER
        self._watches[inbox] = self._observer.schedule(self._forwarder, str(inbox), recursive=recursive,
                                                       event_filter=event_filter)  # fmt: skip
        with self._lock:
            self._dead.discard(inbox)

    def unwatch(self, inbox: Path) -> None:
        watch = self._watches.pop(inbox, None)
        if watch is not None:
            self._observer.unschedule(watch)

    def start(self) -> None:
        logging.getLogger(_OVERFLOW_LOGGER).addHandler(self._overflow)
        self._observer.start()

    def stop(self) -> None:
        logging.getLogger(_OVERFLOW_LOGGER).removeHandler(self._overflow)
        self._observer.stop()
        self._observer.join(timeout=5)
