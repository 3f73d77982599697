"""The whole retry policy: which failures are tried again, when, and what `spoold retry` does.

Transient errors (spoold's `TransientError` classes) and internal errors (any
other exception: a bug in a step or in the runner) use the queue's schedule and
attempts; permanent errors fail the item at once. A crash or a stop never uses
up an attempt: only a failed attempt does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from spoold.daemon.config import RetryPolicy
from spoold.daemon.layout import QueueFolders
from spoold.daemon.messages import Outcome
from spoold.daemon.sidecar import Sidecar, error_record
from spoold.errors import StepError
from spoold.redact import redact

log = logging.getLogger("spoold")

INTERNAL = "internal"


def classify(exc: BaseException) -> tuple[str, bool]:
    """(error type, retryable) for an exception raised while running an item."""
    if isinstance(exc, StepError):
        return exc.type_name, exc.retryable
    return INTERNAL, True


def after_failure(policy: RetryPolicy, sidecar: Sidecar, index: int | None, exc: BaseException,
                  give_up: Callable[[], None]) -> Outcome:  # fmt: skip
    """Record a failed attempt of step `index` in the sidecar: retrying on schedule, or failed.

    `give_up` runs before the sidecar says `failed` (it moves the item to failed/), so whoever reads
    `failed` finds the item there.
    """
    type_name, retryable = classify(exc)
    message = redact(str(exc) or type(exc).__name__)
    step = sidecar.step_entry(index) if index is not None else None
    step_name = step["name"] if step else None
    attempt = int(step.get("attempt", 1)) if step else max(1, int(sidecar.doc.get("attempts") or 1))
    where = f"{sidecar.doc['queue']}/{sidecar.name}: {step_name or 'the runner'}"
    if retryable and attempt < policy.attempts:
        delay = policy.delay_before(attempt + 1)
        at = time.time() + delay
        sidecar.retrying(index, error_record(step_name, type_name, message, retryable=True), attempt + 1, at)
        log.warning("%s failed (attempt %d of %d), retrying in %gs: %s", where, attempt, policy.attempts, delay,
                    message)  # fmt: skip
        return Outcome("retry", retry_at=at)
    if retryable:
        message = f"{message} (gave up after {attempt} attempts)"
    give_up()
    sidecar.failed(index, error_record(step_name, type_name, message, retryable=retryable))
    log.error("%s failed: %s", where, message)
    return Outcome("failed")


def fallback_retry(policy: RetryPolicy, sidecar: Sidecar) -> Outcome:
    """When even recording a failure failed (a full disk under the status folder): try again on schedule.

    The in-memory document still counts the attempt, so a failure that persists ends as `failed`.
    """
    attempt = max(1, int(sidecar.doc.get("attempts") or 1))
    if attempt >= policy.attempts:
        sidecar.unrecorded_failure(gives_up=True)
        return Outcome("failed")
    sidecar.unrecorded_failure(gives_up=False)
    return Outcome("retry", retry_at=time.time() + policy.delay_before(attempt + 1))


def requeue_failed(folders: QueueFolders, name: str) -> bool:
    """`spoold retry`: move a failed item back into work/ with fresh attempts; False if it is not failed."""
    sidecar = Sidecar.load(folders.sidecar_path(name))
    if sidecar is None or sidecar.state != "failed":
        return False
    if (folders.failed / name).exists():
        os.rename(folders.failed / name, folders.work / name)
    else:
        (folders.work / name).mkdir(exist_ok=True)
    # A running daemon counts it out of `failed` when it picks it up (daemon/tally.py); dropped at its next write.
    sidecar.doc["requeued_from"] = "failed"
    sidecar.requeue()
    return True
