"""fetch: download the files a request lists, each into a new item of another queue.

The item is a request (`session1.fetch.json`) whose object says
`{"files": [{"url", "name"?, "size"?, "sha256"?}], "fields": {...}}`
(`"urls": [...]` is shorthand for files given only by URL). Each file is
downloaded over HTTP(S) into the request's work folder, verified (size, sha256
when given) and handed to queue `into` as an item named after the file, with
the request's `fields` (so `{session}` works in that queue's destination).

Options: `into` (queue name), `keepalive` (`{url, interval}`: a GET every
interval on a helper thread while downloading, for cameras that sleep
otherwise), `timeout` (read timeout), `connect_timeout`, `retries` (drops
survived in a row without progress before the step gives up for the queue's
retry policy), `min_free` (free bytes to keep beyond the announced size, at
least the config's `min_free`; below it the step waits instead of filling the disk),
`allow_redirects_to` (host names a redirect may lead to besides the URL's own host);
for `s3://bucket/key` URLs `endpoint_url`, `region`, `credential`, `part_size`,
`concurrency` (as for `ship`; such a file comes through the S3 transport).

The server is untrusted: a name comes from the request or the URL's last segment
(decoded, then checked like an inbox name), never from `Content-Disposition`;
redirects go only to http(s) on the URL's host (never https to http) or to an
allowed host; bodies stream to disk, stop one byte past the request's `size`
or at `min_free`, and a keep-alive reply is read to at most 64 KiB.

Downloads resume with HTTP Range after a drop (exponential backoff); a server
that ignores Range restarts the file from zero. Per-file state is kept in the
checkpoint, so a restart resumes. A 404 is permanent for that file only: the
other files finish, then the step fails permanently naming the missing ones.
Side effects: `.<name>.part` files in the request's folder while downloading;
each finished file moves to the new item (hard link, then unlinked here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from spoold.digest import CHUNK_BYTES, hash_file
from spoold.errors import ChecksumMismatch, PermanentError, RemoteMissing, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.s3_source import S3SourceOptions, download_object, is_s3_url, object_name
from spoold.http_status import follow_redirect
from spoold.options import Bytes, Seconds
from spoold.transports.base import check_component, redact_url
from spoold.transports.local import part_name

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REDIRECTS = 5
_BACKOFF_MAX_SECONDS = 30.0
# A keep-alive reply is thrown away; a server that streams one forever must not hold the thread or memory.
_KEEPALIVE_BODY_BYTES = 64 << 10
_SPACE_CHECK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class KeepAlive:
    url: str
    interval: Seconds = Seconds(3)


@dataclasses.dataclass(frozen=True)
class FetchOptions(S3SourceOptions):
    into: str
    credential: str | None = None
    keepalive: KeepAlive | None = None
    timeout: Seconds = Seconds(60)
    connect_timeout: Seconds = Seconds(10)
    retries: int = 6
    min_free: Bytes = Bytes(0)
    allow_redirects_to: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for host in self.allow_redirects_to:
            if not host or any(c in host for c in "/@ ") or host.count(":") == 1:
                raise ValueError(f"allow_redirects_to: {host!r} must be a bare host name (no scheme, port or path)")

    def redirect_hosts(self) -> frozenset[str]:
        return frozenset(h.strip("[]").lower() for h in self.allow_redirects_to)


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


class Fetch(Handler[FetchOptions]):
    name = "fetch"
    Options = FetchOptions
    shorthand = "into"

    def validate(self, queue_names: frozenset[str], is_queue_of_requests: bool) -> str | None:
        if self.options.into not in queue_names:
            return f"fetch into {self.options.into!r}: no such queue; queues: {', '.join(sorted(queue_names))}"
        if not is_queue_of_requests:
            return "fetch needs a queue of requests (items: requests)"
        return None

    def run(self, ctx: StepContext) -> StepResult:
        files = _parse_request(ctx)
        fields = ctx.fields.get("fields") or {}
        if not isinstance(fields, dict):
            raise PermanentError("the request's 'fields' must be an object")
        states: dict[str, dict[str, Any]] = ctx.checkpoint.data.setdefault("files", {})
        total = sum(f.size or 0 for f in files)
        keepalive = (_KeepAlive(self.options.keepalive, ctx, self.options.allow_redirects_to)
                     if self.options.keepalive else None)  # fmt: skip
        try:
            for spec in files:
                state = states.setdefault(spec.name, {"state": "pending", "bytes": 0})
                if state["state"] != "handed_over":
                    self._one_file(ctx, spec, state, fields, files, total)
        finally:
            if keepalive:
                keepalive.stop()
        missing = [n for n, s in states.items() if s["state"] == "missing"]
        bad = [n for n, s in states.items() if s["state"] == "mismatch"]
        result = {"into": self.options.into, "items": {n: s.get("item") for n, s in states.items() if s.get("item")},
                  "missing": missing, "mismatched": bad, "files": len(files)}  # fmt: skip
        if keepalive:
            result["keepalive_pings"] = keepalive.pings
        if missing:
            raise PermanentError(f"not found on the server: {', '.join(missing)}"
                                 + (f"; checksum mismatch: {', '.join(bad)}" if bad else ""))  # fmt: skip
        if bad:
            reasons = "; ".join(f"{n} ({states[n].get('error')})" for n in bad)
            raise ChecksumMismatch(f"downloaded files do not match their size or sha256: {reasons}")
        return StepResult(result=result)

    def _one_file(self, ctx: StepContext, spec: FileSpec, state: dict[str, Any], fields: dict[str, Any],
                  files: list[FileSpec], total: int) -> None:  # fmt: skip
        final = ctx.item_dir / spec.name
        part = ctx.item_dir / part_name(spec.name, ".part")
        states = ctx.checkpoint.data["files"]

        def report(done: int) -> None:
            state["bytes"] = done
            finished = sum(1 for s in states.values() if s["state"] == "handed_over")
            so_far = sum(s.get("bytes", 0) for s in states.values())
            ctx.progress(so_far, max(total, so_far), files_done=finished, files_total=len(files))

        # A "downloaded" file whose link is gone was handed over just before a crash: hand_over finds that item.
        if state["state"] != "downloaded":
            state["state"] = "downloading"
            ctx.checkpoint.save()
            try:
                self._wait_for_space(ctx, spec, part)
                if is_s3_url(spec.url):
                    settings = {**self.options.s3_settings(), "credential": self.options.credential,
                                "connect_timeout": self.options.connect_timeout}  # fmt: skip
                    download_object(ctx, spec.url, settings, part, state, report)
                else:
                    _Download(self.options, ctx, spec, part, report).run()
            except RemoteMissing as exc:
                state.update(state="missing", error=str(exc))
                ctx.checkpoint.save()
                ctx.log.warning("%s", exc)
                return
            problem = _verify(part, spec)
            if problem:
                part.unlink()
                state.update(state="mismatch", bytes=0, error=problem)
                ctx.checkpoint.save()
                ctx.log.warning("%s: %s", spec.name, problem)
                return
            os.replace(part, final)
            state.update(state="downloaded", bytes=final.stat().st_size)
            state.pop("error", None)
            ctx.checkpoint.save()
        state["item"] = ctx.hand_over(self.options.into, [final], fields, name=spec.name)
        # The new item holds its own link; dropping ours lets its `delete_source` free the space.
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
        state["state"] = "handed_over"
        ctx.checkpoint.save()
        report(state["bytes"])
        ctx.log.info("fetched %s into %s/%s", spec.name, self.options.into, state["item"])

    def _wait_for_space(self, ctx: StepContext, spec: FileSpec, part: Path) -> None:
        have = part.stat().st_size if part.exists() else 0
        remaining = spec.size - have if spec.size is not None else 0
        needed = remaining + max(int(self.options.min_free), ctx.min_free_bytes)
        while (free := ctx.free_bytes()) < needed:
            ctx.waiting(f"free space: {spec.name} needs {needed} bytes, {free} free", 10)
            ctx.sleep(10)


def _parse_request(ctx: StepContext) -> list[FileSpec]:
    raw = ctx.fields.get("files")
    if raw is None and isinstance(ctx.fields.get("urls"), list):
        raw = [{"url": u} for u in ctx.fields["urls"]]
    if not isinstance(raw, list) or not raw:
        raise PermanentError("a fetch request needs a non-empty 'files' (or 'urls') list")
    files: list[FileSpec] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise PermanentError(f"files[{index}] needs a 'url' string")
        url = entry["url"]
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "s3"):
            raise PermanentError(f"files[{index}]: only http://, https:// and s3:// URLs can be fetched")
        # The last segment is cut out before decoding, so `..%2F..%2Fx` is checked as the `../../x` it means.
        segment = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        name = entry.get("name") or (object_name(url) if is_s3_url(url) else segment)
        if not isinstance(name, str):
            raise PermanentError(f"files[{index}]: the name must be a string")
        check_component(name, f"files[{index}] ({redact_url(url)})")
        if name.startswith(".") or name == ctx.item:
            raise PermanentError(f"files[{index}]: {name!r} is not a usable file name")
        size, sha256 = entry.get("size"), entry.get("sha256")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise PermanentError(f"files[{index}]: size must be a whole number of bytes")
        if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256.lower())):
            raise PermanentError(f"files[{index}]: sha256 must be 64 hex digits")
        files.append(FileSpec(url, name, size, sha256.lower() if sha256 else None))
    if len({f.name for f in files}) != len(files):
        raise PermanentError("two files of the request have the same name")
    return files


def _verify(path: Path, spec: FileSpec) -> str | None:
    size = path.stat().st_size
    if spec.size is not None and size > spec.size:
        return f"the server sent more than the {spec.size} bytes the request says"
    if spec.size is not None and size != spec.size:
        return f"got {size} bytes, the request says {spec.size}"
    if spec.sha256 and (actual := hash_file(path, ["sha256"])["sha256"]) != spec.sha256:
        return f"sha256 is {actual[:16]}…, the request says {spec.sha256[:16]}…"
    return None


def _open(url: str, options: FetchOptions, headers: dict[str, str]) -> tuple[http.client.HTTPConnection, Any]:
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


class _Download:
    """One file into `part`, resuming with Range and backing off after drops."""

    def __init__(self, options: FetchOptions, ctx: StepContext, spec: FileSpec, part: Path, report: Any) -> None:
        self.options, self.ctx, self.spec, self.part, self.report = options, ctx, spec, part, report

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
        conn, response = _open(self.spec.url, self.options, headers)
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
            self._receive(response, offset)
            done = self.part.stat().st_size
            if self.spec.size is not None and done > self.spec.size:
                return True  # more than the request says: verification names it, no point in resuming
            return expected is None or done >= expected
        finally:
            conn.close()

    def _receive(self, response: Any, offset: int) -> None:
        last_report = 0.0
        # The server's Content-Length is not trusted: one byte past the request's size is enough to know.
        cap = None if self.spec.size is None else self.spec.size + 1
        with open(self.part, "r+b" if offset else "wb") as stream:
            stream.seek(offset)
            stream.truncate()
            done, checked = offset, offset
            while (want := CHUNK_BYTES if cap is None else min(CHUNK_BYTES, cap - done)) > 0 and (
                chunk := response.read1(want)  # read1: what has arrived, so progress moves
            ):
                stream.write(chunk)
                done += len(chunk)
                if time.monotonic() - last_report >= 0.5:
                    stream.flush()
                    self.report(done)
                    last_report = time.monotonic()
                if done - checked >= _SPACE_CHECK_BYTES:
                    checked = done
                    self._check_space(done)
                self.ctx.check_stop()
            stream.flush()
            os.fsync(stream.fileno())
        self.report(done)

    def _check_space(self, done: int) -> None:
        """A body with no announced size (or a lying one) must not fill the disk past `min_free`."""
        floor = max(int(self.options.min_free), self.ctx.min_free_bytes)
        if floor and (free := self.ctx.free_bytes()) < floor:
            raise OutOfSpace(f"{self.spec.name}: free space fell to {free} bytes (below min_free) after "
                             f"{done} bytes; the download goes on later")  # fmt: skip


class _KeepAlive:
    """A GET to `url` every `interval` on a helper thread, so the camera does not sleep mid-download."""

    def __init__(self, options: KeepAlive, ctx: StepContext, allowed: list[str]) -> None:
        self.options, self.ctx, self.allowed = options, ctx, allowed
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fetch-keepalive", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        timeout = FetchOptions(into="", timeout=Seconds(5), connect_timeout=Seconds(5),
                               allow_redirects_to=self.allowed)  # fmt: skip
        while not self._stop.is_set():
            try:
                conn, response = _open(self.options.url, timeout, {})
                try:
                    response.read(_KEEPALIVE_BODY_BYTES)
                finally:
                    conn.close()
                self.pings += 1
            except (OSError, http.client.HTTPException, PermanentError) as exc:
                self.ctx.log.debug("keep-alive %s failed: %s", redact_url(self.options.url), exc)
            self._stop.wait(float(self.options.interval))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
