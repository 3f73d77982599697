"""The worker threads that run items' jobs: reused, never fewer than the jobs running, gone when idle."""

from __future__ import annotations

import threading

from spoold.daemon.workers import Workers
from tests.conftest import wait_for


def test_a_job_after_another_runs_on_the_same_thread() -> None:
    workers = Workers()
    seen: list[int] = []
    for _ in range(3):
        job = workers.start("q/item", lambda: seen.append(threading.get_ident()))
        job.join(timeout=10)
        assert not job.is_alive()
        # The thread counts itself idle just after the job's end: wait for that before the next start.
        wait_for(lambda: workers.idle_threads == 1, 10, "the worker idle")
    assert len(seen) == 3 and len(set(seen)) == 1


def test_jobs_started_together_run_at_the_same_time() -> None:
    workers = Workers()
    count = 5
    arrived = threading.Barrier(count, timeout=10)  # breaks (raising in the jobs) unless all run at once
    passed: list[bool] = []

    def job() -> None:
        arrived.wait()
        passed.append(True)

    jobs = [workers.start(f"q/{n}", job) for n in range(count)]
    for started in jobs:
        started.join(timeout=15)
    assert passed == [True] * count


def test_a_job_that_raises_still_ends_and_the_thread_serves_the_next() -> None:
    workers = Workers()

    def broken() -> None:
        raise RuntimeError("a bug")

    failing = workers.start("q/broken", broken)
    failing.join(timeout=10)
    assert not failing.is_alive()
    ran = threading.Event()
    workers.start("q/next", ran.set).join(timeout=10)
    assert ran.is_set()


def test_idle_threads_end() -> None:
    workers = Workers("spoold-test-worker")
    workers.IDLE_SECONDS = 0.2
    ends = [workers.start(f"q/{n}", lambda: None) for n in range(3)]
    for job in ends:
        job.join(timeout=10)

    def none_left() -> bool:
        return not any(t.name == "spoold-test-worker" or t.name.startswith("q/") for t in threading.enumerate()
                       if t.daemon)  # fmt: skip

    wait_for(none_left, 10, "idle workers gone")
    assert workers.idle_threads == 0
    again = threading.Event()
    workers.start("q/later", again.set).join(timeout=10)
    assert again.is_set()
