"""The conditions a `wait` step polls: a remote path (settled or not), a far sidecar, an HTTP(S) JSON status.

A condition's keys are a `ConditionOptions`, checked when the config is loaded; a run makes one
`Poller` per condition (`make_poller`), which keeps what it learns between polls in memory: the
signature of a path that is settling. After a restart a path settles again from the start, which
makes a wait longer, never shorter.

The far side is untrusted: a glob match is checked name by name (`_check_match`), a sidecar is read
to at most 1 MiB, an HTTP reply as `spoold.http_status` allows, and values quoted in messages are cut short.
"""

from __future__ import annotations

import dataclasses
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

from spoold.errors import PermanentError
from spoold.handlers.base import StepContext, StepResult
from spoold.http_status import get_json, shown_url
from spoold.options import Seconds
from spoold.templates import render_url, shadowed_builtins
from spoold.transports.base import RemoteEntry, Transport, check_component, format_url, parse_url, redact_url

SIDECAR_BYTES = 1 << 20
KINDS = ("path", "sidecar", "url")
# Which condition each sub-option belongs to.
_SUB_OPTIONS: dict[str, tuple[str, ...]] = {
    "settle": ("path",), "state": ("sidecar",), "json": ("url",), "fail_on": ("url",), "import": ("sidecar", "url"),
}  # fmt: skip
_SCALARS = (str, int, float, bool, type(None))
_MISSING = object()

SidecarState = Literal["queued", "running", "waiting", "retrying", "done", "failed"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConditionOptions:
    """The keys of one condition: exactly one of `path`, `sidecar`, `url`, and that one's sub-options."""

    path: str | None = None
    settle: Seconds | None = None
    sidecar: str | None = None
    state: SidecarState | None = None
    url: str | None = None
    json_: dict[str, Any] | None = dataclasses.field(default=None, metadata={"key": "json"})
    fail_on: dict[str, Any] | None = None
    import_: list[str] | None = dataclasses.field(default=None, metadata={"key": "import"})

    def kinds_given(self) -> list[str]:
        return [kind for kind in KINDS if getattr(self, kind) is not None]

    def sub_options_given(self) -> list[str]:
        values = {"settle": self.settle, "state": self.state, "json": self.json_, "fail_on": self.fail_on,
                  "import": self.import_}  # fmt: skip
        return [key for key, value in values.items() if value is not None]

    def check(self) -> None:
        """Raise ValueError, with what to write instead, unless this is one complete condition."""
        kinds = self.kinds_given()
        if len(kinds) != 1:
            got = f"; got {' and '.join(kinds)}" if kinds else ""
            raise ValueError("give exactly one of path (a remote path or glob), sidecar (another spool's sidecar) "
                             f"or url (an HTTP(S) JSON status){got}")  # fmt: skip
        kind = kinds[0]
        for key in self.sub_options_given():
            if kind not in _SUB_OPTIONS[key]:
                raise ValueError(f"{key} works only with {' or '.join(_SUB_OPTIONS[key])}, not with {kind}")
        if self.settle is not None and self.settle <= 0:
            raise ValueError("settle must be more than 0s")
        if self.url is not None:
            if self.url.split("://", 1)[0].lower() not in ("http", "https"):
                raise ValueError(f"url must begin with http:// or https://, got {shown_url(self.url)!r}; "
                                 "a remote file or folder is a path")  # fmt: skip
            if not self.json_:
                raise ValueError("url needs json: the fields of the reply that mean done, e.g. {status: COMPLETED}")
            _check_matches("json", self.json_)
            _check_matches("fail_on", self.fail_on or {})
        for name in self.import_ or []:
            if not name or "." in name:
                raise ValueError(f"import takes plain top-level field names (no dots), got {name!r}")
        if shadowed := shadowed_builtins(dict.fromkeys(self.import_ or [])):
            raise ValueError(f"import {', '.join(shadowed)} would shadow the built-in template value of the same "
                             "name; import another field")  # fmt: skip


def _check_matches(option: str, matches: Mapping[str, Any]) -> None:
    for key, value in matches.items():
        if not key or "" in key.split("."):
            raise ValueError(f"{option}: {key!r} is not a field name or a dotted path (status, result.state)")
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, _SCALARS) for v in values):
            raise ValueError(f"{option}.{key} must be a value or a non-empty list of values (strings, numbers, "
                             "booleans); for a nested field write a dotted key such as result.state")  # fmt: skip


def lookup(doc: Mapping[str, Any], dotted: str) -> Any:
    """The value at `a.b.c` in `doc`, or `_MISSING`."""
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def matches(value: Any, wanted: Any) -> bool:
    """Whether a JSON value is one the config names; `true` is never `1`, `"5"` never `5`."""
    for candidate in wanted if isinstance(wanted, list) else [wanted]:
        if isinstance(value, bool) or isinstance(candidate, bool):
            if value is candidate:
                return True
        elif isinstance(value, (int, float)) and isinstance(candidate, (int, float)):
            if value == candidate:
                return True
        elif type(value) is type(candidate) and value == candidate:
            return True
    return False


def quoted(value: Any) -> str:
    """A value from the far side for a message, cut short: a server must not flood a sidecar."""
    text = json.dumps(value) if value is not _MISSING else "missing"
    return text if len(text) <= 80 else text[:60] + "…"


@dataclasses.dataclass
class Poll:
    """What one poll found: the condition held (`result`), or not yet, maybe with a note and a sooner recheck."""

    result: StepResult | None = None
    note: str = ""
    recheck_seconds: float | None = None


class Poller(ABC):
    """One condition during one run of a wait step."""

    kind: ClassVar[str]

    def __init__(self, options: ConditionOptions, settings: Mapping[str, Any], ctx: StepContext) -> None:
        self.options = options
        self.settings = settings
        self.url = self.render(ctx)
        self.shown = redact_url(self.url)

    def render(self, ctx: StepContext) -> str:
        return ctx.render(getattr(self.options, self.kind))

    @abstractmethod
    def describe(self) -> str:
        """What this condition waits for, in a few words for the waiting message."""

    @abstractmethod
    def poll(self, ctx: StepContext) -> Poll:
        """Look once; raise TransientError to be polled again, PermanentError to fail the step."""


class PathPoller(Poller):
    kind = "path"

    def __init__(self, options: ConditionOptions, settings: Mapping[str, Any], ctx: StepContext) -> None:
        super().__init__(options, settings, ctx)
        self.remote_path = parse_url(self.url).path
        # (signature of the match, monotonic time it was first seen) while the match settles.
        self._settling: tuple[tuple[Any, ...], float] | None = None

    def render(self, ctx: StepContext) -> str:
        # A value's `*?[` match only themselves, so a name cannot widen the glob.
        return render_url(self.options.path or "", ctx.template_values(), glob=True)

    def describe(self) -> str:
        settle = self.options.settle
        return f"{self.shown} to exist" + (f" and stay unchanged for {settle:g}s" if settle else "")

    def poll(self, ctx: StepContext) -> Poll:
        transport: Transport = ctx.transport(self.url, self.settings)
        found = _found(transport, self.remote_path, self.shown)
        settle = self.options.settle
        if found is None or not settle:
            self._settling = None
            return Poll(result=found)
        path = found.result["found"]
        # Names, sizes, mtimes and kinds of the whole tree; the path too, so a newer glob match starts afresh.
        signature = (path, *((e.path, e.size, e.mtime, e.is_dir) for e in transport.tree(path)))
        now = time.monotonic()
        if self._settling is None or self._settling[0] != signature:
            self._settling = (signature, now)
            return Poll(note=f"found {path}, settling", recheck_seconds=settle)
        quiet = now - self._settling[1]
        if quiet >= settle - 0.01:  # the sleep that brought us here may end a hair early
            found.result["settled_s"] = round(quiet, 1)
            return Poll(result=found)
        return Poll(note=f"found {path}, unchanged for {quiet:.0f}s", recheck_seconds=settle - quiet)


class SidecarPoller(Poller):
    kind = "sidecar"

    def describe(self) -> str:
        return f"{self.shown} to reach state {self.options.state or 'done'!r}"

    def poll(self, ctx: StepContext) -> Poll:
        transport: Transport = ctx.transport(self.url, self.settings)
        path = parse_url(self.url).path
        entry = transport.stat(path)
        if entry is None or entry.is_dir:
            return Poll()
        data = transport.read_bytes(path, SIDECAR_BYTES + 1)
        if len(data) > SIDECAR_BYTES:
            raise PermanentError(f"{self.shown} is larger than {SIDECAR_BYTES} bytes; it is not a spoold sidecar")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return Poll()  # written atomically, so this is not a sidecar yet; poll again
        if not isinstance(doc, dict):
            raise PermanentError(f"{self.shown} is not a spoold sidecar (not a JSON object)")
        state = doc.get("state")
        if state == (self.options.state or "done"):
            return Poll(result=self._imported(doc))
        if state == "failed":
            error = doc.get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            step = error.get("step") if isinstance(error, dict) else None
            raise PermanentError(f"far item {doc.get('queue')}/{doc.get('item')} failed"
                                 f"{f' in step {step}' if step else ''}: {message or 'no reason given'}")  # fmt: skip
        return Poll(note=f"now {quoted(state)}")

    def _imported(self, doc: dict[str, Any]) -> StepResult:
        raw_fields = doc.get("fields")
        far_fields: dict[str, Any] = raw_fields if isinstance(raw_fields, dict) else {}
        fields: dict[str, Any] = {}
        for name in self.options.import_ or []:
            if name in far_fields:
                fields[name] = far_fields[name]
            elif name in doc and name not in ("fields", "steps"):
                fields[name] = doc[name]
            else:
                raise PermanentError(f"{self.shown} reached {doc.get('state')!r} but has no field {name!r} to import")
        result = {"sidecar": self.shown, "state": doc.get("state"), "imported": sorted(fields)}
        return StepResult(result=result, fields=fields)


class UrlPoller(Poller):
    kind = "url"

    def __init__(self, options: ConditionOptions, settings: Mapping[str, Any], ctx: StepContext) -> None:
        super().__init__(options, settings, ctx)
        self.shown = shown_url(self.url)  # userinfo and query tokens stay out of every message

    def describe(self) -> str:
        wanted = " and ".join(f"{k}={quoted(v)}" for k, v in (self.options.json_ or {}).items())
        return f"{self.shown} to say {wanted}"

    def poll(self, ctx: StepContext) -> Poll:
        doc = get_json(self.url, float(self.settings.get("connect_timeout") or 30))
        if doc is None:
            return Poll(note="HTTP 404 so far")
        for key, wanted in (self.options.fail_on or {}).items():
            if matches(value := lookup(doc, key), wanted):
                raise PermanentError(f"{self.shown} says {key} = {quoted(value)}, which means failed (fail_on)")
        now = {key: lookup(doc, key) for key in self.options.json_ or {}}
        if not all(matches(now[key], wanted) for key, wanted in (self.options.json_ or {}).items()):
            return Poll(note="now " + ", ".join(f"{k}={quoted(v)}" for k, v in now.items()))
        fields: dict[str, Any] = {}
        for name in self.options.import_ or []:
            if name not in doc:
                raise PermanentError(f"{self.shown} says done but has no field {name!r} to import")
            fields[name] = doc[name]
        result = {"url": self.shown, "status": now, "imported": sorted(fields)}
        return Poll(result=StepResult(result=result, fields=fields))


POLLERS: dict[str, type[Poller]] = {"path": PathPoller, "sidecar": SidecarPoller, "url": UrlPoller}


def make_poller(options: ConditionOptions, settings: Mapping[str, Any], ctx: StepContext) -> Poller:
    return POLLERS[options.kinds_given()[0]](options, settings, ctx)


def _found(transport: Transport, path: str, shown: str) -> StepResult | None:
    matches_: list[RemoteEntry] = []
    if any(c in path for c in "*?["):
        matches_ = transport.glob(path)
        if not matches_:
            return None
        newest: RemoteEntry = max(matches_, key=lambda e: (e.mtime, e.path))
        _check_match(path, newest.path, shown)
    else:
        entry = transport.stat(path)
        if entry is None:
            return None
        newest = entry
        matches_ = [entry]
    url = format_url(parse_url(shown).with_path(newest.path)) if "://" in shown else newest.path
    fields = {"found": newest.path, "found_url": url}
    return StepResult(result={"found": newest.path, "matches": len(matches_), "url": url}, fields=fields)


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
