"""One GET of a small JSON status document over HTTP(S), as `wait: {url: ...}` polls it.

The server is untrusted. The whole exchange (connect, headers, body) has one time budget, so a
server that accepts and then trickles or stalls cannot hold a poll past it; the body is read to
at most `MAX_BODY_BYTES`; redirects are followed only to http(s) on the URL's own host and never
from https to plain http (the rule `fetch` applies to downloads). Messages name the URL as
`shown_url` gives it: no userinfo, and query values that look like secrets masked.

What a reply means: 2xx with a JSON object is the document; 404 is "not there yet" (None);
408, 429, 5xx, a lost or refused connection, a timeout, a body that is not JSON, not an object or
too large are `TransientError` (poll again); any other status is `PermanentError`.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from typing import Any

from spoold.errors import PermanentError, TransientError
from spoold.redact import redact

MAX_BODY_BYTES = 1 << 20
MAX_REDIRECTS = 5
_READ_BYTES = 64 << 10
_HEADERS = {"Accept": "application/json", "User-Agent": "spoold-wait", "Connection": "close"}


def shown_url(url: str) -> str:
    """`url` for messages: scheme, host, port, path, and the query with secret-looking values masked."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    query = f"?{redact(parts.query)}" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


def follow_redirect(origin: str, current: str, location: str, allowed: frozenset[str] = frozenset(),
                    allow_option: str | None = None) -> str:  # fmt: skip
    """Where a redirect from `current` leads, if it may be followed: http(s), on `origin`'s host or one of
    `allowed`, never https -> http. `allow_option` names the step option that would allow another host."""
    target = urllib.parse.urljoin(current, location)
    parts, now = urllib.parse.urlsplit(target), urllib.parse.urlsplit(current)
    host, home = (parts.hostname or "").lower(), (urllib.parse.urlsplit(origin).hostname or "").lower()
    shown = f"{shown_url(origin)} redirects to {shown_url(target)}"
    if parts.scheme not in ("http", "https") or not host:
        raise PermanentError(f"only http:// and https:// redirects are followed, and {shown}")
    if now.scheme == "https" and parts.scheme == "http":
        raise PermanentError(f"{shown}: a redirect from https to plain http is never followed")
    if host != home and host not in allowed:
        hint = f" unless the step allows it ({allow_option}: [{host}])" if allow_option else ""
        raise PermanentError(f"{shown}: a redirect to another host ({host}) is not followed{hint}")
    return target


def get_json(url: str, timeout_seconds: float) -> dict[str, Any] | None:
    """The JSON object at `url`, or None on 404; see the module's docstring for what each reply means."""
    deadline = time.monotonic() + timeout_seconds
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            status, location, body = _exchange(current, deadline)
        except (OSError, http.client.HTTPException) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
            raise TransientError(f"GET {shown_url(url)}: {reason}") from None
        if status in (301, 302, 303, 307, 308) and location:
            current = follow_redirect(url, current, location)
            continue
        return _document(shown_url(url), status, body)
    raise PermanentError(f"GET {shown_url(url)}: more than {MAX_REDIRECTS} redirects")


def _exchange(url: str, deadline: float) -> tuple[int, str | None, bytes]:
    """(status, Location, body up to one byte past the limit) of one GET, all within `deadline`."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise PermanentError(f"bad port in URL {shown_url(url)}") from None
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", port, timeout=_left(deadline))
    try:
        conn.connect()
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=_HEADERS)
        _budget(conn, deadline)
        response = conn.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            return response.status, response.getheader("Location"), b""
        body = bytearray()
        while len(body) <= MAX_BODY_BYTES:
            _budget(conn, deadline)
            chunk = response.read1(min(_READ_BYTES, MAX_BODY_BYTES + 1 - len(body)))
            if not chunk:
                break
            body += chunk
        return response.status, None, bytes(body)
    finally:
        conn.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _budget(conn: http.client.HTTPConnection, deadline: float) -> None:
    """Give the next socket read only what is left of the poll's time, so trickling bytes cannot extend it."""
    if conn.sock is not None:
        conn.sock.settimeout(_left(deadline))


def _document(shown: str, status: int, body: bytes) -> dict[str, Any] | None:
    if status == 404:
        return None
    if status >= 500 or status in (408, 429):
        raise TransientError(f"GET {shown}: HTTP {status}")
    if not 200 <= status < 300:
        raise PermanentError(f"GET {shown}: HTTP {status}")
    if len(body) > MAX_BODY_BYTES:
        raise TransientError(f"GET {shown}: the reply is larger than {MAX_BODY_BYTES} bytes; not a status document")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise TransientError(f"GET {shown}: the reply is not JSON ({body[:60]!r})") from None
    if not isinstance(doc, dict):
        raise TransientError(f"GET {shown}: the reply is JSON but not an object")
    return doc
