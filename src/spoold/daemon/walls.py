"""The main loop's walls: one message's or one timer's trouble is logged, and the loop goes on."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from spoold.daemon.logs import about
from spoold.daemon.messages import ItemAdopted, ItemFinished, Message, PathEvent, StateChanged, StepEnded

log = logging.getLogger("spoold")


def guarded(what: str, action: Callable[[], object]) -> None:
    """Run `action`; an exception is logged as a failure of `what`, never raised."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the wall around one timer's work
        log_failure(what, exc)


def log_failure(what: str, exc: Exception) -> None:
    if isinstance(exc, OSError):
        # The environment (a folder gone, a full disk): one line says it; a traceback would not help.
        log.error("%s failed: %s", what, exc)
    else:
        log.exception("internal error while %s; carrying on", what)


def describe(message: Message) -> str:
    match message:
        case StateChanged(queue, item, _) | ItemFinished(queue, item, _) | ItemAdopted(queue, item):
            return f"{type(message).__name__} of {queue}/{item}"
        case StepEnded(queue, step):
            return f"StepEnded of {queue} step {step}"
        case PathEvent(path, _):
            return f"an event at {path}"
    return type(message).__name__


def about_message(message: Message) -> AbstractContextManager[None]:
    """What the loop logs while acting on `message` is about the message's queue and item."""
    match message:
        case StateChanged(queue, item, _) | ItemFinished(queue, item, _) | ItemAdopted(queue, item):
            return about(queue, item)
        case StepEnded(queue, step):
            return about(queue, None, step)
    return contextlib.nullcontext()
