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
`allow_redirects_to` (host names a redirect may lead to besides the URL's own host),
`rate` (a cap on the request's bandwidth, such as `2MiB/s`, beside the spool-wide `rate:`);
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
The progress counts the whole request (`fetch_progress`): its bytes, `files_done`
of `files_total`, and the `file` being fetched; a size the request leaves out is
taken from the server's Content-Length or Content-Range, and while any is unknown
`bytes_total` is null.
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
import urllib.parse
from pathlib import Path
from typing import Any

from spoold.digest import hash_file
from spoold.errors import ChecksumMismatch, PermanentError, RemoteMissing
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.fetch_http import FileSpec, HttpDownload, open_url
from spoold.handlers.fetch_progress import RequestProgress
from spoold.handlers.s3_source import S3SourceOptions, download_object, is_s3_url, object_name
from spoold.options import Bytes, Rate, Seconds
from spoold.ratelimit import Limiter
from spoold.transports.base import check_component, redact_url
from spoold.transports.local import part_name

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A keep-alive reply is thrown away; a server that streams one forever must not hold the thread or memory.
_KEEPALIVE_BODY_BYTES = 64 << 10


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
    rate: Rate | None = None

    def __post_init__(self) -> None:
        for host in self.allow_redirects_to:
            if not host or any(c in host for c in "/@ ") or host.count(":") == 1:
                raise ValueError(f"allow_redirects_to: {host!r} must be a bare host name (no scheme, port or path)")

    def redirect_hosts(self) -> frozenset[str]:
        return frozenset(h.strip("[]").lower() for h in self.allow_redirects_to)


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
        progress = RequestProgress(ctx, files, states)
        limiter = ctx.limiter(self.options.rate)  # one cap for the whole request, file after file
        keepalive = (_KeepAlive(self.options.keepalive, ctx, self.options.allow_redirects_to)
                     if self.options.keepalive else None)  # fmt: skip
        try:
            for spec in files:
                state = states.setdefault(spec.name, {"state": "pending", "bytes": 0})
                if state["state"] != "handed_over":
                    self._one_file(ctx, spec, state, fields, progress, limiter)
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
                  progress: RequestProgress, limiter: Limiter) -> None:  # fmt: skip
        final = ctx.item_dir / spec.name
        part = ctx.item_dir / part_name(spec.name, ".part")
        report = progress.reporter(spec, state)

        # A "downloaded" file whose link is gone was handed over just before a crash: hand_over finds that item.
        if state["state"] != "downloaded":
            state["state"] = "downloading"
            ctx.checkpoint.save()
            try:
                self._wait_for_space(ctx, spec, part)
                report(part.stat().st_size if part.exists() else 0, None)  # the sidecar names this file now
                if is_s3_url(spec.url):
                    settings = {**self.options.s3_settings(), "credential": self.options.credential,
                                "connect_timeout": self.options.connect_timeout}  # fmt: skip
                    download_object(ctx, spec.url, settings, part, state, report, limiter)
                else:
                    HttpDownload(self.options, ctx, spec, part, report, limiter).run()
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
        progress.handed_over(spec)
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
                conn, response = open_url(self.options.url, timeout, {})
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
