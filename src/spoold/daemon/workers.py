"""Threads that run items' chains, kept for reuse.

A thread per item cost a thread start per small item in a burst, and the main loop waited in each start
for the new thread's first turn at the GIL, behind the busy workers. Here the loop only queues the job:
an idle thread takes it, or one is started when none is idle. Each queue's `concurrency` is held by its
book (daemon/queues.py), not here; a thread idle for `IDLE_SECONDS` ends, so an idle daemon holds none.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("spoold.workers")


class Job:
    """One item's run in a worker thread: `join` waits for its end, as a thread's would."""

    __slots__ = ("_ended", "name", "work")

    def __init__(self, name: str, work: Callable[[], None]) -> None:
        self.name = name
        self.work = work
        self._ended = threading.Event()

    def is_alive(self) -> bool:
        return not self._ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._ended.wait(timeout)

    def run(self) -> None:
        try:
            self.work()
        except Exception:
            log.exception("%s: a worker's job raised", self.name)  # a bug: the job reports its own errors
        finally:
            self._ended.set()


class Workers:
    IDLE_SECONDS = 10.0

    def __init__(self, name: str = "spoold-worker") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        # Threads waiting for a job, less the jobs queued for them: each queued job has a thread to take it.
        self._idle = 0
        self._lock = threading.Lock()

    @property
    def idle_threads(self) -> int:
        """Threads waiting for a job that none is queued for."""
        with self._lock:
            return self._idle

    def start(self, name: str, work: Callable[[], None]) -> Job:
        job = Job(name, work)
        with self._lock:
            self._jobs.put(job)
            is_covered = self._idle > 0
            if is_covered:
                self._idle -= 1
        if not is_covered:
            threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        return job

    def _serve(self) -> None:
        thread = threading.current_thread()
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # Jobs are queued under the lock: one queued now was counted on a thread like this one.
                    if self._jobs.empty():
                        self._idle -= 1
                        return
                continue
            thread.name = job.name  # what a stack dump (py-spy) shows
            job.run()
            thread.name = self._name
            with self._lock:
                self._idle += 1
