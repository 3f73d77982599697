"""One file of a `fetch` request over HTTP(S): GET with Range resume, backoff after drops, paced by `rate:`.

The server is untrusted: redirects are followed only where `follow_redirect`
allows, its Content-Length never bounds the body (one byte past the request's
`size` is enough to know), and the sizes it announces (Content-Length,
Content-Range) only tell the progress how much there is.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from spoold.digest import CHUNK_BYTES
from spoold.errors import PermanentError, RemoteMissing, TransientError
from spoold.handlers.base import StepContext
from spoold.http_status import follow_redirect
from spoold.ratelimit import Limiter
from spoold.transports.base import redact_url

_REDIRECTS = 5
_BACKOFF_MAX_SECONDS = 30.0
_SPACE_CHECK_BYTES = 64 << 20
_REPORT_SECONDS = 0.5
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

# report(bytes of the file so far, its size when a server just said it)
Report = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class FileSpec:
    url: str
    name: str
    size: int | None
    sha256: str | None


class FileMissing(RemoteMissing):
    """Raised when the server says a listed file does not exist (404/410)."""


class OutOfSpace(TransientError):
    """Raised when a download stops because free space fell below `min_free`."""


class HttpOptions(Protocol):
    """What a download needs of `fetch`'s options."""

    @property
    def timeout(self) -> float: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def retries(self) -> int: ...
    @property
    def min_free(self) -> int: ...
    def redirect_hosts(self) -> frozenset[str]: ...


def open_url(url: str, options: HttpOptions, headers: dict[str, str]) -> tuple[http.client.HTTPConnection, Any]:
    """GET `url` with separate connect and read timeouts, following a few redirects that `follow_redirect` allows."""
    origin = url
    for _ in range(_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port, timeout=float(options.connect_timeout))
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(float(options.timeout))
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            conn.close()
            url = follow_redirect(origin, url, response.getheader("Location") or "", options.redirect_hosts(),
                                  "allow_redirects_to")
            continue
        return conn, response
    raise PermanentError(f"too many redirects for {redact_url(url)}")


def announced_size(response: Any, offset: int) -> int | None:
    """The whole file's size as the server states it: Content-Range's total, else offset + Content-Length."""
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
        if match:
            return int(match.group(3))
    length = response.getheader("Content-Length")
    if length and length.isdigit() and not response.getheader("Transfer-Encoding"):
        return offset + int(length)
    return None


class HttpDownload:
    """One file into `part`, resuming with Range and backing off after drops; `report` hears every step of it."""

    def __init__(self, options: HttpOptions, ctx: StepContext, spec: FileSpec, part: Path, report: Report,
                 limiter: Limiter) -> None:  # fmt: skip
        self.options, self.ctx, self.spec, self.part, self.report = options, ctx, spec, part, report
        self.limiter = limiter

    def run(self) -> None:
        failures = 0
        while True:
            self.ctx.check_stop()
            before = self.part.stat().st_size if self.part.exists() else 0
            try:
                if self._attempt(before):
                    return
                problem = "the connection closed early"
            except OutOfSpace:
                raise
            except (OSError, http.client.HTTPException, TransientError) as exc:
                problem = str(exc) or type(exc).__name__
            after = self.part.stat().st_size if self.part.exists() else 0
            failures = 0 if after > before else failures + 1
            if failures > self.options.retries:
                raise TransientError(f"{self.spec.name}: giving up for now after {failures} drops: {problem}")
            delay = min(_BACKOFF_MAX_SECONDS, 0.5 * 2 ** max(failures - 1, 0))
            self.ctx.log.info("%s: %s at %d bytes; resuming in %.1fs", self.spec.name, problem, after, delay)
            self.ctx.sleep(delay)

    def _attempt(self, offset: int) -> bool:
        """Download from `offset`; True when the file is complete."""
        if self.spec.size is not None and offset == self.spec.size:
            return True
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        conn, response = open_url(self.spec.url, self.options, headers)
        try:
            status = response.status
            where = f"{self.spec.name} ({redact_url(self.spec.url)})"
            if status in (404, 410):
                raise FileMissing(f"{where}: HTTP {status}, not on the server")
            if status == 416 and offset:
                self.part.unlink()  # the saved part is longer than the file now is: start over
                raise TransientError(f"{where}: range not satisfiable at {offset}; restarting")
            if status >= 500 or status in (408, 429):
                raise TransientError(f"{where}: HTTP {status}")
            if status not in (200, 206):
                raise PermanentError(f"{where}: HTTP {status} {response.reason}")
            if status == 206 and not (response.getheader("Content-Range") or "").startswith(f"bytes {offset}-"):
                raise TransientError(f"{where}: the server answered another range than bytes {offset}-")
            if status == 200:
                offset = 0  # no Range (or ignored): the body is the whole file, from its first byte
            length = response.getheader("Content-Length")
            expected = offset + int(length) if length and length.isdigit() else None
            # The request's size if it gave one, else what this server says (only for the progress).
            self.report(offset, announced_size(response, offset))
            self._receive(response, offset)
            done = self.part.stat().st_size
            if self.spec.size is not None and done > self.spec.size:
                return True  # more than the request says: verification names it, no point in resuming
            return expected is None or done >= expected
        finally:
            conn.close()

    def _receive(self, response: Any, offset: int) -> None:
        last_report = time.monotonic()
        # The server's Content-Length is not trusted: one byte past the request's size is enough to know.
        cap = None if self.spec.size is None else self.spec.size + 1
        piece = self.limiter.piece_bytes(CHUNK_BYTES)
        with open(self.part, "r+b" if offset else "wb") as stream:
            stream.seek(offset)
            stream.truncate()
            done, checked = offset, offset
            while (want := piece if cap is None else min(piece, cap - done)) > 0 and (
                chunk := response.read1(want)  # read1: what has arrived, so progress moves
            ):
                stream.write(chunk)
                done += len(chunk)
                if time.monotonic() - last_report >= _REPORT_SECONDS:
                    stream.flush()
                    self.report(done, None)
                    last_report = time.monotonic()
                if done - checked >= _SPACE_CHECK_BYTES:
                    checked = done
                    self._check_space(done)
                self.limiter.acquire(len(chunk))  # the caps; `Interrupted` if the daemon stops meanwhile
                self.ctx.check_stop()
            stream.flush()
            os.fsync(stream.fileno())
        self.report(done, None)

    def _check_space(self, done: int) -> None:
        """A body with no announced size (or a lying one) must not fill the disk past `min_free`."""
        floor = max(int(self.options.min_free), self.ctx.min_free_bytes)
        if floor and (free := self.ctx.free_bytes()) < floor:
            raise OutOfSpace(f"{self.spec.name}: free space fell to {free} bytes (below min_free) after "
                             f"{done} bytes; the download goes on later")  # fmt: skip
