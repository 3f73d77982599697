"""Logging set-up: one line per event, redacted; under systemd, journal records with the item's fields.

Every record about an item carries its queue, item and step (`SPOOLD_QUEUE`,
`SPOOLD_ITEM`, `SPOOLD_STEP` in the journal), so `journalctl -u spoold
SPOOLD_ITEM=episode_000005` tells one item's story. They come from one place:
`about()` marks a stretch of code as being about an item (the runner's thread
for its whole run, the main loop while it handles an item's message), and
`ItemFieldsFilter` copies the mark onto each record logged there. A single
call elsewhere passes `extra=fields(queue, item)`, which wins over the mark.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator

from spoold.daemon.journal import ITEM_FIELDS, JournalHandler, is_journal_stream, priority
from spoold.redact import RedactingFilter

# boto3/botocore debug output carries signed headers; paramiko's transport log is noisy.
_QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "paramiko", "watchdog")

# (queue, item, step) of the code running now; a new thread starts with none.
_about: contextvars.ContextVar[tuple[str | None, str | None, str | None]] = contextvars.ContextVar(
    "spoold_about", default=(None, None, None))  # fmt: skip


@contextlib.contextmanager
def about(queue: str | None, item: str | None = None, step: str | None = None) -> Iterator[None]:
    """Records logged in this block (in this thread) are about `queue`/`item`/`step`."""
    token = _about.set((queue, item, step))
    try:
        yield
    finally:
        _about.reset(token)


def fields(queue: str, item: str | None = None, step: str | None = None) -> dict[str, str | None]:
    """`extra=` for one log call about an item, outside any `about()` block."""
    return {attribute: value for (attribute, _), value in zip(ITEM_FIELDS, (queue, item, step), strict=True)}


class ItemFieldsFilter(logging.Filter):
    """Gives every record `spoold_queue`, `spoold_item` and `spoold_step` (None when not about one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _about.get()
        if any(getattr(record, attribute, None) is not None for attribute, _ in ITEM_FIELDS):
            values = (None, None, None)  # the call said which item itself: nothing of the mark is mixed in
        for (attribute, _), value in zip(ITEM_FIELDS, values, strict=True):
            if getattr(record, attribute, None) is None:
                setattr(record, attribute, value)
        return True


class JournalFormatter(logging.Formatter):
    """`<3>message`: journald reads the syslog priority prefix of a stream line and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        return f"<{priority(record.levelno)}>{text}"


def make_handler() -> logging.Handler:
    """The journal's native protocol when stderr is the journal, else lines on stderr."""
    stderr = logging.StreamHandler(sys.stderr)
    handler: logging.Handler = stderr
    if is_journal_stream(sys.stderr.fileno()):
        stderr.setFormatter(JournalFormatter("%(name)s: %(message)s"))
        handler = JournalHandler(stderr)
    else:
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Filters run in order, in the thread that logs: the item's fields first, then redaction of the message.
    handler.addFilter(ItemFieldsFilter())
    handler.addFilter(RedactingFilter())
    return handler


def setup_logging(level: str = "info") -> None:
    handler = make_handler()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
