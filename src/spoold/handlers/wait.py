"""wait: keep the item in state `waiting` until a remote path exists or another spool's item reaches a state.

Options: either `path` (URL template, may hold a glob with `*`, `?`, `[..]`,
`**`; the newest match becomes field `found`, its URL `found_url`) or
`sidecar` (URL of another spool's sidecar) with `state` (default `done`) and
`import` (fields of that sidecar to copy into this item's fields); `interval`
(between polls, default 10s), `timeout` (default 24h, counted from the first
poll, across daemon restarts), and the connection options `identity`,
`password_file`, `credential`, `known_hosts`, `host_key`, `connect_timeout`.
Works with `sftp://` and `file://`.

Side effects: none but the item's fields. A far-side `failed` fails this item
permanently with the far side's error; a timeout fails it permanently. A lost
connection while polling is logged and polling goes on until the timeout.

The far side is untrusted: a glob match becomes `found` only if every name
below the pattern's fixed folder is one path component (like an inbox name),
else the step fails naming it; a sidecar is read to at most 1 MiB.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import PurePosixPath
from typing import Any, Literal

from spoold.errors import PermanentError, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.options import Seconds
from spoold.templates import render_url
from spoold.transports.base import (
    ConnectionOptions,
    RemoteEntry,
    Transport,
    check_component,
    format_url,
    parse_url,
    redact_url,
)

SIDECAR_BYTES = 1 << 20

SidecarState = Literal["queued", "running", "waiting", "retrying", "done", "failed"]


@dataclasses.dataclass(frozen=True)
class WaitOptions(ConnectionOptions):
    path: str | None = None
    sidecar: str | None = None
    state: SidecarState = "done"
    import_: list[str] = dataclasses.field(default_factory=list, metadata={"key": "import"})
    interval: Seconds = Seconds(10)
    timeout: Seconds = Seconds(86400)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.sidecar is None):
            raise ValueError("give exactly one of path (a remote path or glob) or sidecar (another spool's sidecar)")
        if self.import_ and self.sidecar is None:
            raise ValueError("import works only with sidecar")
        if self.interval <= 0:
            raise ValueError("interval must be more than 0s")


class Wait(Handler[WaitOptions]):
    name = "wait"
    Options = WaitOptions

    def run(self, ctx: StepContext) -> StepResult:
        if self.options.path:
            # A value's `*?[` match only themselves, so a name cannot widen the glob.
            url = render_url(self.options.path, ctx.template_values(), glob=True)
        else:
            url = ctx.render(self.options.sidecar or "")
        parsed = parse_url(url)
        shown = redact_url(url)
        # Wall-clock start in the checkpoint: a restarted daemon keeps counting from the first poll.
        started = float(ctx.checkpoint.data.setdefault("started_at", time.time()))
        ctx.checkpoint.save()
        deadline = started + self.options.timeout
        what = f"{shown} to exist" if self.options.path else f"{shown} to reach state {self.options.state!r}"
        while True:
            ctx.check_stop()
            try:
                transport: Transport = ctx.transport(url, self.options.connection_settings())
                result = self._poll(transport, parsed.path, shown)
                problem = ""
            except TransientError as exc:
                ctx.log.warning("wait: polling %s failed, will poll again: %s", shown, exc)
                result, problem = None, f" (last poll failed: {exc})"
            if result is not None:
                result.result["waited_s"] = round(time.time() - started, 1)
                return result
            now = time.time()
            if now >= deadline:
                ctx.checkpoint.data.pop("started_at", None)  # `spoold retry` starts a fresh wait
                raise PermanentError(f"timed out after {self.options.timeout:g}s waiting for {what}{problem}")
            delay = min(self.options.interval, deadline - now)
            ctx.waiting(f"{what}{problem}", delay)
            ctx.sleep(delay)

    def _poll(self, transport: Transport, path: str, shown: str) -> StepResult | None:
        if self.options.path is not None:
            return _found(transport, path, shown)
        entry = transport.stat(path)
        if entry is None or entry.is_dir:
            return None
        data = transport.read_bytes(path, SIDECAR_BYTES + 1)
        if len(data) > SIDECAR_BYTES:
            raise PermanentError(f"{shown} is larger than {SIDECAR_BYTES} bytes; it is not a spoold sidecar")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return None  # written atomically, so this is not a sidecar yet; poll again
        if not isinstance(doc, dict):
            raise PermanentError(f"{shown} is not a spoold sidecar (not a JSON object)")
        state = doc.get("state")
        if state == self.options.state:
            return self._imported(doc, shown)
        if state == "failed":
            error = doc.get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            step = error.get("step") if isinstance(error, dict) else None
            raise PermanentError(f"far item {doc.get('queue')}/{doc.get('item')} failed"
                                 f"{f' in step {step}' if step else ''}: {message or 'no reason given'}")  # fmt: skip
        return None

    def _imported(self, doc: dict[str, Any], shown: str) -> StepResult:
        raw_fields = doc.get("fields")
        far_fields: dict[str, Any] = raw_fields if isinstance(raw_fields, dict) else {}
        fields: dict[str, Any] = {}
        for name in self.options.import_:
            if name in far_fields:
                fields[name] = far_fields[name]
            elif name in doc and name not in ("fields", "steps"):
                fields[name] = doc[name]
            else:
                raise PermanentError(f"{shown} reached {doc.get('state')!r} but has no field {name!r} to import")
        result = {"sidecar": shown, "state": doc.get("state"), "imported": sorted(fields)}
        return StepResult(result=result, fields=fields)


def _found(transport: Transport, path: str, shown: str) -> StepResult | None:
    matches: list[RemoteEntry] = []
    if any(c in path for c in "*?["):
        matches = transport.glob(path)
        if not matches:
            return None
        newest: RemoteEntry = max(matches, key=lambda e: (e.mtime, e.path))
        _check_match(path, newest.path, shown)
    else:
        entry = transport.stat(path)
        if entry is None:
            return None
        newest = entry
        matches = [entry]
    url = format_url(parse_url(shown).with_path(newest.path)) if "://" in shown else newest.path
    fields = {"found": newest.path, "found_url": url}
    return StepResult(result={"found": newest.path, "matches": len(matches), "url": url}, fields=fields)


def _check_match(pattern: str, found: str, shown: str) -> None:
    """Refuse a match whose names below the pattern's fixed folder are not each one path component."""
    parts = pattern.split("/")
    literal = "/".join(parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))])
    raw = f"{literal}/" if literal or pattern.startswith("/") else ""
    # SFTP joins names onto a tidied folder (`/a//b` -> `/a/b`); S3 keys keep the pattern's own spelling.
    tidy = str(PurePosixPath(literal)).rstrip("/") + "/" if literal else raw
    prefix = next((p for p in (raw, tidy) if found.startswith(p)), None)
    if prefix is None:
        raise PermanentError(f"wait for {shown}: the match {found!r} is not below {literal or '/'}")
    for name in found[len(prefix) :].split("/"):
        check_component(name, f"wait for {shown}: the match {found!r}")
