"""Logging set-up: one line per event, redacted, journald-friendly under systemd."""

from __future__ import annotations

import logging
import os
import sys
from typing import ClassVar

from spoold.redact import RedactingFilter

# boto3/botocore debug output carries signed headers; paramiko's transport log is noisy.
_QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "paramiko", "watchdog")


class JournalFormatter(logging.Formatter):
    """`<3>message`: journald reads the syslog priority prefix and adds its own timestamp."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
    }  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        text = super().format(record).replace("\n", " | ")
        return f"<{priority}>{text}"


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
