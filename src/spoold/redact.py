"""Keeping secrets out of logs, sidecars, health and metrics.

Every secret spoold reads (password files, credentials, keys) is registered
here, and every log record and error message passes through `redact()`, which
also masks the usual shapes of secrets: URL userinfo passwords, Authorization
headers, `password=`/`token=`/`secret=` assignments and AWS-style signatures.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
_known: set[str] = set()
_lock = threading.Lock()
_PATTERNS = [
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/\s:@]*):[^@/\s]*@"), r"\1:" + MASK + "@"),
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(\"?)[^\"\n]+"), r"\1\2" + MASK),
    (re.compile(r"(?i)\b(password|passwd|pwd|token|secret|api[_-]?key|secret_access_key|session_token)"
                r"(\"?\s*[:=]\s*\"?)[^\s\"',;&}]+"), r"\1\2" + MASK),
    (re.compile(r"(?i)(X-Amz-Signature=|X-Amz-Credential=|X-Amz-Security-Token=)[^&\s\"']+"), r"\1" + MASK),
]  # fmt: skip


def register_secret(value: str) -> None:
    """Remember `value` so it is masked wherever it would be written."""
    value = value.strip()
    if len(value) >= 4:
        with _lock:
            _known.add(value)


def redact(text: str) -> str:
    """`text` with every registered secret and every secret-shaped substring masked."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record's message once, redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = redact(message), None
        return True
