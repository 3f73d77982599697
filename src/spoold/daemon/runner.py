"""Running one item's chain in a worker thread, step by step, recording everything in its sidecar.

A step that finished is never run again; a step interrupted by a crash runs
again with its last checkpoint and without using up an attempt. Any failure,
a step's own error or a bug anywhere in the run, goes through `retries`. The
runner reports to the main loop only by posting messages.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spoold.daemon import retries
from spoold.daemon.arriving import ArrivingItem, settle
from spoold.daemon.conditions import unmet_in
from spoold.daemon.config import Config, Queue, Step
from spoold.daemon.context import ItemContext, ItemEnv
from spoold.daemon.handoff import hand_over
from spoold.daemon.layout import QueueFolders, SpoolLayout
from spoold.daemon.logs import about
from spoold.daemon.messages import ItemAdopted, ItemFinished, Message, Outcome, StateChanged, StepEnded, Verdict
from spoold.daemon.metrics import TRANSFER_HANDLERS
from spoold.daemon.recovery import settle_finished
from spoold.daemon.sidecar import FINISHED_STEP_STATES, Sidecar, error_record
from spoold.errors import Interrupted, PermanentError, StepError
from spoold.fsio import fsync_written
from spoold.handlers.base import StepResult
from spoold.redact import redact
from spoold.transports import TransportPool

log = logging.getLogger("spoold.runner")

# Errors of the spool's filesystem rather than of the code: logged without a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


class ItemRunner:
    """Runs the remaining steps of one item; `run_and_report` is a worker thread's whole job."""

    def __init__(
        self, config: Config, layout: SpoolLayout, queue: Queue, sidecar: Sidecar, *, transports: TransportPool,
        stop_event: threading.Event, post: Callable[[Message], None], arriving: ArrivingItem | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.layout = layout
        self.queue = queue
        self.folders: QueueFolders = layout.queues[queue.name]
        self.sidecar = sidecar
        self.stop_event = stop_event
        self.post = post
        # Set while the bundle is still being written into the inbox (a first step that starts early).
        self.arriving = arriving
        self.env = ItemEnv(config, queue, self.folders, sidecar, transports, stop_event, self._report_state,
                           self._hand_over, layout.free_bytes)  # fmt: skip

    def run_and_report(self) -> None:
        with about(self.queue.name, self.sidecar.name):
            outcome = self.run()
        self.post(ItemFinished(self.queue.name, self.sidecar.name, outcome))

    def run(self) -> Outcome:
        """Run the chain from where the sidecar says it stands; never raises."""
        index: int | None = None
        try:
            self.sidecar.sync_steps([s.name for s in self.queue.steps])
            for step in self.queue.steps:
                index = step.index
                if self.sidecar.step_entry(index).get("state") in FINISHED_STEP_STATES:
                    continue
                if self.stop_event.is_set():
                    return self._interrupted(index)
                # A `when:` is judged on the whole bundle: its size, and the fields its ready marker brings.
                needs_whole = self.arriving is not None and (self.arriving.is_complete() or step.when is not None
                                                             or not step.handler.starts_early)  # fmt: skip
                if needs_whole and (outcome := self._await_arrival(index)):
                    return outcome
                if self._is_skipped(step):
                    continue
                if (outcome := self._run_step(step)) is not None:
                    return outcome
            self.sidecar.write_held()  # the last step's end, before the item leaves work/
            self._move_out("done")
            self.sidecar.done()
            return Outcome("done")
        except Exception as exc:  # noqa: BLE001 - a bug in the runner is this item's failure, not the daemon's
            if is_disk_error(exc):
                # The spool's disk (full, read-only, out of inodes), not a bug: one line, and retried.
                log.error("%s/%s: cannot record the item's state: %s", self.queue.name, self.sidecar.name, exc)
            else:
                log.error("%s/%s: internal error: %s", self.queue.name, self.sidecar.name,
                          redact("".join(traceback.format_exception(exc)).strip()))  # fmt: skip
            return self._failed_attempt(self.sidecar.current_step_index() if index is None else index, exc)

    def _is_skipped(self, step: Step) -> bool:
        """Judge the step's `when:` now, once: a step that ever started is never skipped on a later run."""
        entry = self.sidecar.step_entry(step.index)
        if step.when is None or "started" in entry:
            return False
        reason = unmet_in(step.when, self.sidecar.doc, self.folders.work / self.sidecar.name)
        if reason is None:
            return False
        log.info("%s/%s: step %d (%s) skipped: %s", self.queue.name, self.sidecar.name, step.index + 1, step.name,
                 reason)  # fmt: skip
        self.sidecar.skipped(step.index, reason)
        return True

    def _run_step(self, step: Step) -> Outcome | None:
        with about(self.queue.name, self.sidecar.name, step.name):
            self.sidecar.start_step(step.index)
            self._report_state("running")
            ctx = ItemContext(self.env, step.index, self.arriving)
            started, bytes_before = time.monotonic(), self._bytes_done(step)
            try:
                result = step.handler.run(ctx)
            except Interrupted:
                return self._interrupted(step.index)
            except Exception as exc:  # noqa: BLE001 - a handler bug is contained, logged and retried
                # Measured before anything else: waiting for a still-arriving bundle is not the step's time.
                seconds, moved = time.monotonic() - started, self._moved(step, bytes_before)
                if not isinstance(exc, StepError) and not is_disk_error(exc):
                    log.error("step %s of %s/%s crashed: %s", step.name, self.queue.name, self.sidecar.name,
                              redact("".join(traceback.format_exception(exc)).strip()))  # fmt: skip
                outcome = self._await_arrival(step.index) or self._failed_attempt(step.index, exc)
                self._attempt_ended(step, outcome.verdict, seconds, moved)
                return outcome
            # Read before the sidecar records the step done, which drops its progress.
            self._attempt_ended(step, "done", time.monotonic() - started, self._moved(step, bytes_before))
            if stopped := self._await_arrival(step.index):
                return stopped
            self._apply(ctx, step.index, result)
            return None

    def _bytes_done(self, step: Step) -> int | None:
        """The bytes a transfer step's progress shows now; None for a step that moves no bytes."""
        if step.handler.name not in TRANSFER_HANDLERS:
            return None
        progress = self.sidecar.step_entry(step.index).get("progress")
        if not isinstance(progress, dict) or progress.get("unit", "bytes") != "bytes":
            return 0
        done = progress.get("bytes_done")
        return done if isinstance(done, int) and not isinstance(done, bool) and done > 0 else 0

    def _moved(self, step: Step, before: int | None) -> int | None:
        after = self._bytes_done(step)
        return None if after is None or before is None else max(0, after - before)

    def _attempt_ended(self, step: Step, verdict: Verdict, seconds: float, moved: int | None) -> None:
        if verdict == "interrupted":
            return  # stopped by a shutdown, not ended: the next start resumes the same attempt
        result = "ok" if verdict == "done" else verdict
        self.post(StepEnded(self.queue.name, step.name, result, seconds, moved))

    def _await_arrival(self, index: int) -> Outcome | None:
        """Wait for a still-arriving bundle's ready marker and settle it; an Outcome when the item stops here.

        Nothing is recorded as final (a failure, a later step) before the producer said the bundle is whole.
        """
        arriving = self.arriving
        if arriving is None:
            return None
        self.sidecar.write_held()  # the wait may be long: what is over is recorded before it
        try:
            arriving.wait_complete()
        except Interrupted:
            return self._interrupted(index)
        self.arriving = None
        settle(self.folders, self.sidecar, arriving.entry, arriving.fields)
        arriving.close()
        if arriving.rejection is None:
            return None
        self._move_out("failed")
        self.sidecar.failed(index, error_record(None, "rejected", arriving.rejection, retryable=False))
        log.error("%s/%s: rejected: %s", self.queue.name, self.sidecar.name, arriving.rejection)
        return Outcome("failed")

    def _apply(self, ctx: ItemContext, index: int, result: StepResult) -> None:
        def relative(paths: list[Path]) -> list[str]:
            return [str(p.relative_to(ctx.item_dir)) for p in paths]

        fsync_written([*(result.outputs or []), *result.extras])  # durable before the sidecar says done
        payload = [] if result.is_payload_removed else (relative(result.outputs) if result.outputs is not None
                                                         else None)  # fmt: skip
        # Written with what comes next (the next step's start, a skip, the item's end), which follows at once.
        self.sidecar.step_done(index, result.result, payload=payload, extras=relative(result.extras),
                               fields=result.fields, is_written=False)  # fmt: skip

    def _interrupted(self, index: int | None) -> Outcome:
        self.sidecar.interrupted(index)
        return Outcome("interrupted")

    def _failed_attempt(self, index: int | None, exc: BaseException) -> Outcome:
        try:
            return retries.after_failure(self.queue.spec.retry, self.sidecar, index, exc,
                                         lambda: self._move_out("failed"))  # fmt: skip
        except Exception as second:  # noqa: BLE001 - cannot even record it (disk full): retry on schedule
            log.error("%s/%s: cannot record the failure: %s", self.queue.name, self.sidecar.name, second)
            return retries.fallback_retry(self.queue.spec.retry, self.sidecar)

    def _move_out(self, state: str) -> None:
        """Move the finished item where it belongs before its sidecar says so, so readers find it there.

        If the move fails (failed/ cannot be written), the sidecar still tells the truth, and the loop's
        periodic pick-up moves the item later.
        """
        try:
            settle_finished(self.queue, self.folders, self.sidecar, state)
        except OSError as exc:
            log.error("%s/%s: cannot move the item to %s/: %s", self.queue.name, self.sidecar.name, state, exc)

    def _report_state(self, state: str) -> None:
        self.post(StateChanged(self.queue.name, self.sidecar.name, state))

    def _hand_over(self, ctx: ItemContext, queue: str, paths: list[Path], fields: Mapping[str, Any],
                   name: str | None) -> str:  # fmt: skip
        target, folders = self.config.queues.get(queue), self.layout.queues.get(queue)
        if target is None or folders is None:
            raise PermanentError(f"no local queue named {queue!r}")
        doc = self.sidecar.doc
        new_name = hand_over(self.config, target, folders, ctx, f"{self.queue.name}/{doc['item']}@{doc['created']}",
                             paths, fields, name)  # fmt: skip
        self.post(ItemAdopted(queue, new_name))
        return new_name
