"""Running one item's chain, step by step, recording everything in its sidecar.

A step that finished is never run again; a step interrupted by a crash runs
again with its last checkpoint and without using up an attempt. Errors are
classified only by spoold's own exception classes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from spoold.daemon.arriving import ArrivingItem, settle
from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar, now_iso
from spoold.errors import Interrupted, StepError
from spoold.handlers.base import ItemKind, StepResult
from spoold.redact import redact
from spoold.templates import render
from spoold.transports import TransportPool

log = logging.getLogger("spoold.runner")

Verdict = Literal["done", "retry", "failed", "interrupted"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    retry_at: float | None = None


class SidecarCheckpoint:
    def __init__(self, sidecar: Sidecar, entry: dict[str, Any]) -> None:
        self._sidecar = sidecar
        self.data: dict[str, Any] = entry.setdefault("checkpoint", {})

    def save(self) -> None:
        self._sidecar.write()


class ItemContext:
    """The daemon's side of `StepContext` for one running step."""

    def __init__(self, runner: ItemRunner, entry: dict[str, Any]) -> None:
        doc = runner.sidecar.doc
        self._runner = runner
        self._entry = entry
        self.queue = runner.queue.name
        self.item = runner.sidecar.name
        self.kind: ItemKind = doc["kind"]
        self.item_dir = runner.folders.work / self.item
        self.payload = [self.item_dir / p for p in doc["payload"]]
        self.extras = [self.item_dir / p for p in doc["extras"]]
        self.fields: dict[str, Any] = doc["fields"]
        self.digests: dict[str, dict[str, str]] = doc["digests"]
        self.checkpoint = SidecarCheckpoint(runner.sidecar, entry)
        self.min_free_bytes = runner.config.min_free_bytes
        self.arriving = runner.arriving
        self.log = logging.LoggerAdapter(logging.getLogger(f"spoold.{entry['name']}"), {"item": self.item})
        self._rate_sample: tuple[float, int] | None = None

    def template_values(self) -> dict[str, Any]:
        doc = self._runner.sidecar.doc
        name = self.item
        stem, dot, ext = name.rpartition(".")
        values: dict[str, Any] = {
            "name": name, "stem": stem if dot else name, "ext": ext if dot else "", "queue": self.queue,
            "host": self._runner.config.host, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "original_name": doc["original_name"], "item": name, "item_dir": str(self.item_dir),
            "path": str(self.payload[0]) if self.payload else str(self.item_dir),
        }  # fmt: skip
        if len(self.digests) == 1:
            values.update(next(iter(self.digests.values())))
        values.update(self.fields)
        return values

    def render(self, template: str) -> str:
        return render(template, self.template_values())

    def progress(self, done: int, total: int, **extra: Any) -> None:
        now = time.monotonic()
        rate = None
        if self._rate_sample is None:
            self._rate_sample = (now, done)
        elif now - self._rate_sample[0] >= 0.5:
            rate = (done - self._rate_sample[1]) / (now - self._rate_sample[0])
            self._rate_sample = (now, done)
        doc = self._runner.sidecar.doc
        if doc["state"] == "waiting":
            # Progress means the wait is over (e.g. a download resumed after free space came back).
            doc["state"] = "running"
            self._entry.pop("waiting", None)
            self._runner.sidecar.write()
            self._runner.on_state(self.queue, self.item, "running")
        progress = self._entry.setdefault("progress", {})
        progress.update({"bytes_done": done, "bytes_total": total, **extra})
        if rate is not None:
            progress["rate_bps"] = round(rate)
            progress["eta_s"] = round((total - done) / rate, 1) if rate > 0 and total >= done else None
        self._runner.sidecar.write_progress()

    def waiting(self, message: str, next_check_in_seconds: float) -> None:
        doc = self._runner.sidecar.doc
        self._entry["waiting"] = {"for": message, "next_check_at": now_iso(time.time() + next_check_in_seconds)}
        if doc["state"] != "waiting":
            doc["state"] = "waiting"
            self._runner.sidecar.write()
            self._runner.on_state(self.queue, self.item, "waiting")
        else:
            self._runner.sidecar.write_progress()

    def sleep(self, seconds: float) -> None:
        if self._runner.stop_event.wait(max(seconds, 0.0)):
            raise Interrupted("the daemon is stopping")

    def check_stop(self) -> None:
        if self._runner.stop_event.is_set():
            raise Interrupted("the daemon is stopping")

    def transport(self, url: str, settings: Mapping[str, Any]) -> Any:
        return self._runner.transports.get(url, settings)

    def hand_over(self, queue: str, paths: list[Path], fields: Mapping[str, Any], name: str | None = None) -> str:
        return self._runner.hand_over(queue, self, paths, fields, name)

    def free_bytes(self) -> int:
        return self._runner.free_bytes()


HandOver = Callable[["ItemRunner", str, ItemContext, list[Path], Mapping[str, Any], str | None], str]


class ItemRunner:
    """Runs the remaining steps of one item; used from a worker thread."""

    def __init__(
        self, config: Config, queue: Queue, folders: QueueFolders, sidecar: Sidecar, *, transports: TransportPool,
        stop_event: threading.Event, on_state: Callable[[str, str, str], None], hand_over: HandOver,
        free_bytes: Callable[[], int], arriving: ArrivingItem | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.queue = queue
        self.folders = folders
        self.sidecar = sidecar
        self.transports = transports
        self.stop_event = stop_event
        self.on_state = on_state
        self._hand_over = hand_over
        self.free_bytes = free_bytes
        # Set while the bundle is still being written into the inbox (a first step that starts early).
        self.arriving = arriving

    def hand_over(
        self, queue: str, ctx: ItemContext, paths: list[Path], fields: Mapping[str, Any], name: str | None
    ) -> str:
        return self._hand_over(self, queue, ctx, paths, fields, name)

    def run(self) -> Outcome:
        doc = self.sidecar.doc
        self.sidecar.sync_steps([s.name for s in self.queue.steps])
        for step in self.queue.steps:
            entry = self.sidecar.step_entry(step.index)
            if entry.get("state") == "done":
                continue
            if self.stop_event.is_set():
                return self._interrupted(entry)
            needs_whole = self.arriving is not None and (self.arriving.is_complete() or not step.handler.starts_early)
            if needs_whole and (outcome := self._await_arrival(entry)):
                return outcome
            outcome = self._run_step(step.index, step.handler, entry)
            if outcome is not None:
                return outcome
        doc.update(state="done", step=None, error=None, next_attempt_at=None)
        self.sidecar.write()
        return Outcome("done")

    def _run_step(self, index: int, handler: Any, entry: dict[str, Any]) -> Outcome | None:
        doc = self.sidecar.doc
        entry.setdefault("attempt", 1)
        entry.update(state="running", started=now_iso())
        entry.pop("finished", None)
        entry.pop("error", None)
        doc.update(state="running", step=entry["name"], attempts=entry["attempt"], next_attempt_at=None, error=None)
        self.sidecar.write()
        self.on_state(self.queue.name, self.sidecar.name, "running")
        ctx = ItemContext(self, entry)
        try:
            result = handler.run(ctx)
        except Interrupted:
            return self._interrupted(entry)
        except StepError as exc:
            return self._await_arrival(entry) or self._failed_attempt(entry, exc, exc.retryable, exc.type_name)
        except Exception as exc:  # noqa: BLE001 - a handler bug is contained, logged and retried
            log.error("step %s of %s/%s crashed: %s", entry["name"], self.queue.name, self.sidecar.name,
                      redact("".join(traceback.format_exception(exc)).strip()))  # fmt: skip
            return self._await_arrival(entry) or self._failed_attempt(entry, exc, True, "internal")
        if outcome := self._await_arrival(entry):
            return outcome
        self._apply(ctx, entry, result)
        return None

    def _await_arrival(self, entry: dict[str, Any]) -> Outcome | None:
        """Wait for a still-arriving bundle's ready marker and settle it; an Outcome when the item stops here.

        Nothing is recorded as final (a failure, a later step) before the producer said the bundle is whole.
        """
        arriving = self.arriving
        if arriving is None:
            return None
        try:
            arriving.wait_complete()
        except Interrupted:
            return self._interrupted(entry)
        self.arriving = None
        settle(self.folders, self.sidecar, arriving.entry, arriving.fields)
        arriving.close()
        if arriving.rejection is None:
            return None
        error = {"step": None, "type": "rejected", "message": arriving.rejection, "retryable": False}
        entry.update(state="failed", error=error, finished=now_iso())
        self.sidecar.doc.update(state="failed", error=error, next_attempt_at=None)
        self.sidecar.write()
        log.error("%s/%s: rejected: %s", self.queue.name, self.sidecar.name, arriving.rejection)
        return Outcome("failed")

    def _apply(self, ctx: ItemContext, entry: dict[str, Any], result: StepResult) -> None:
        doc = self.sidecar.doc
        item_dir = ctx.item_dir

        def relative(paths: list[Path]) -> list[str]:
            return [str(p.relative_to(item_dir)) for p in paths]

        if result.outputs is not None:
            doc["payload"] = relative(result.outputs)
        if result.is_payload_removed:
            doc["payload"] = []
        for extra in relative(result.extras):
            if extra not in doc["extras"]:
                doc["extras"].append(extra)
        doc["fields"].update(result.fields)
        entry.update(state="done", finished=now_iso(), result=result.result)
        entry.pop("progress", None)
        entry.pop("waiting", None)
        entry.pop("checkpoint", None)
        self.sidecar.write()

    def _interrupted(self, entry: dict[str, Any]) -> Outcome:
        # The checkpoint stays; the next start resumes the step from it.
        entry["state"] = "interrupted"
        self.sidecar.doc["state"] = "queued"
        self.sidecar.write()
        return Outcome("interrupted")

    def _failed_attempt(self, entry: dict[str, Any], exc: BaseException, retryable: bool, type_name: str) -> Outcome:
        doc = self.sidecar.doc
        message = redact(str(exc) or type(exc).__name__)
        error = {"step": entry["name"], "type": type_name, "message": message, "retryable": retryable}
        attempt = int(entry.get("attempt", 1))
        policy = self.queue.spec.retry
        doc["error"] = error
        entry.update(error=error, finished=now_iso())
        if retryable and attempt < policy.attempts:
            delay = policy.delay_before(attempt + 1)
            entry.update(state="retrying", attempt=attempt + 1)
            doc.update(state="retrying", next_attempt_at=now_iso(time.time() + delay))
            self.sidecar.write()
            log.warning("%s/%s: %s failed (attempt %d of %d), retrying in %gs: %s", self.queue.name,
                        self.sidecar.name, entry["name"], attempt, policy.attempts, delay, message)  # fmt: skip
            return Outcome("retry", retry_at=time.time() + delay)
        entry["state"] = "failed"
        doc.update(state="failed", next_attempt_at=None)
        if retryable:
            error["message"] = f"{message} (gave up after {attempt} attempts)"
        self.sidecar.write()
        log.error("%s/%s: %s failed: %s", self.queue.name, self.sidecar.name, entry["name"], error["message"])
        return Outcome("failed")
