"""publish: update a shared JSON document (a room manifest, a registry) without losing a concurrent update.

Options: `to` (URL template of the document: `s3://bucket/key` or `file:///path`),
`set` (map of dotted paths to values), `remove` (list of dotted paths),
`retries` (conflicts before the step gives up, default 20), and for `s3://`
the connection options `endpoint_url`, `region`, `credential`,
`connect_timeout`. Example (field note 003):

    publish: {to: 's3://rooms/{room_id}/manifest.json',
              set: {'datasets.{name}': {key: '{name}.tar', sha256: '{sha256}'}}}

Optimistic locking: the step reads the document with its version (the S3 ETag,
or the sha256 of a file), applies the change, and writes it back only if the
version is unchanged (`If-Match`; `If-None-Match: *` when the document does not
exist yet, which creates it). When another writer got there first the write is
refused, and the step reads again and re-applies its change, up to `retries`
times with jittered exponential backoff (50 ms doubling up to 2 s); past that it
fails as transient and the queue's retry schedule takes over. `file://`
documents use a lock file beside them and an atomic replace
(`transports.local_documents`).

Templates: in `to` (escaped, kept inside its literal folder, as for `ship`), in
the keys of `set` and `remove`, and in every string inside a value (nested
mappings and lists included, their keys too). A key's literal dots separate
levels and each level is rendered on its own, so a field holding a dot stays
one key (`datasets.{name}` with name `a.b` sets `datasets["a.b"]`) and a field
can never reach another part of the document; a level that renders empty is an
error. A string that is exactly one `{field}` takes the field's value with its
JSON type (a number stays a number); any other string is text. Write `{{` for a
literal brace.

The change: `remove` first, then `set`. Missing objects on the way are created;
setting through something that is not an object is a permanent error naming
the path; removing what is not there is fine. A document that is not a JSON
object, or larger than 16 MiB, is a permanent error and is left as it is. When
the change leaves the document as it was, nothing is written.

Idempotent: re-applying the same `set` and `remove` gives the same document, so
after `kill -9` at any instant the re-run either writes the change or finds it
already there. The result: `{"to", "version" (the version written, or found
when nothing changed), "conflicts", "changed"}`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import secrets
import string
from collections.abc import Callable, Mapping
from typing import Any

from spoold.errors import PermanentError, TemplateError, TransientError, VersionConflict
from spoold.fsio import encode_json
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.options import Seconds
from spoold.templates import render_text, render_url, template_fields
from spoold.transports.base import parse_url, redact_url, shown_name
from spoold.transports.documents import MAX_DOCUMENT_BYTES

SCHEMES = ("s3", "file")
FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 2.0
MAX_RETRIES = 1000
_WHOLE_FIELD = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_formatter = string.Formatter()
_random = secrets.SystemRandom()

KeyPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PublishOptions:
    to: str
    set_: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"key": "set"})
    remove: list[str] = dataclasses.field(default_factory=list)
    retries: int = 20
    endpoint_url: str | None = None
    region: str | None = None
    credential: str | None = None
    connect_timeout: Seconds = Seconds(30)

    def __post_init__(self) -> None:
        scheme = self.to.split("://", 1)[0].lower() if "://" in self.to else ""
        if scheme not in SCHEMES:
            raise ValueError(f"to: {redact_url(self.to)!r} must be an s3:// or file:// URL of a JSON document")
        if self.to.endswith("/"):
            raise ValueError(f"to: {redact_url(self.to)!r} ends in '/': name the document itself, not a folder")
        if not self.set_ and not self.remove:
            raise ValueError("nothing to publish: give set, remove or both")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"retries must be between 0 and {MAX_RETRIES}")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url: {redact_url(self.endpoint_url)!r} must be an http:// or https:// URL")
        try:
            for key, value in self.set_.items():
                key_segments(key, "set")
                check_value(value, f"set.{key}")
            for key in self.remove:
                key_segments(key, "remove")
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        both = sorted(set(self.set_) & set(self.remove))
        if both:
            raise ValueError(f"{both[0]!r} is in both set and remove; say which")


def key_segments(key: str, where: str) -> list[str]:
    """The template of each level of dotted path `key`: `datasets.{name}` -> [`datasets`, `{name}`].

    Split on the literal dots only (a format spec such as `{x:.2f}` holds a dot of its own).
    """
    segments = [""]
    try:
        parsed = list(_formatter.parse(key))
    except ValueError as exc:
        raise TemplateError(f"{where}: malformed template {key!r}: {exc}") from None
    for literal, name, spec, conversion in parsed:
        head, *rest = literal.replace("{", "{{").replace("}", "}}").split(".")
        segments[-1] += head
        segments.extend(rest)
        if name is not None:
            segments[-1] += "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
    if any(not s for s in segments):
        raise TemplateError(f"{where}: {key!r} has an empty level (a leading, trailing or doubled dot)")
    for segment in segments:
        template_fields(segment)  # refuses `{a.b}`, `{0}` and other than plain names
    return segments


def check_value(value: Any, where: str) -> None:
    """Refuse what JSON cannot hold (YAML's dates, sets, ...) and malformed templates, naming the path."""
    if isinstance(value, str):
        template_fields(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TemplateError(f"{where}: the key {key!r} is not a string; quote it")
            template_fields(key)
            check_value(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise TemplateError(f"{where}: {value} is not a number JSON can hold")
    elif not (value is None or isinstance(value, (bool, int, float))):
        raise TemplateError(f"{where}: {type(value).__name__} {value!r} cannot go in JSON; quote it to make it text")


@dataclasses.dataclass(frozen=True)
class Change:
    """What to do to the document, templates already rendered: remove these paths, then set these."""

    removes: list[KeyPath]
    sets: list[tuple[KeyPath, Any]]

    def apply(self, document: dict[str, Any]) -> None:
        for path in self.removes:
            parent: Any = document
            for segment in path[:-1]:
                parent = parent.get(segment) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        for path, value in self.sets:
            parent = document
            for depth, segment in enumerate(path[:-1]):
                child = parent.setdefault(segment, {})
                if not isinstance(child, dict):
                    raise PermanentError(f"cannot set {shown_path(path)}: {shown_path(path[: depth + 1])} holds "
                                         f"{json_kind(child)}, not an object")  # fmt: skip
                parent = child
            # A copy: a later `set` below this path must not change the value kept for the next attempt.
            parent[path[-1]] = copy.deepcopy(value)


@dataclasses.dataclass(frozen=True)
class Published:
    version: str | None
    conflicts: int
    is_changed: bool


def render_change(options: PublishOptions, values: Mapping[str, Any]) -> Change:
    """`set` and `remove` with every template filled from `values`."""
    removes = [render_key(key, values) for key in options.remove]
    sets = [(render_key(key, values), render_value(value, values)) for key, value in options.set_.items()]
    return Change(removes, sets)


def render_key(key: str, values: Mapping[str, Any]) -> KeyPath:
    path = tuple(render_text(segment, values) for segment in key_segments(key, "key"))
    if not all(path):
        raise TemplateError(f"the key {key!r} renders with an empty level: {shown_path(path)}")
    return path


def render_value(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _WHOLE_FIELD.match(value)
        if whole and values.get(whole.group(1)) is not None:
            return _as_json(values[whole.group(1)])
        return render_text(value, values)
    if isinstance(value, Mapping):
        return {render_text(k, values): render_value(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(item, values) for item in value]
    return value


def publish(
    transport: Any, target: str, change: Change, *, retries: int, sleep: Callable[[float], None], shown: str,
    limit: int = MAX_DOCUMENT_BYTES,
) -> Published:  # fmt: skip
    """Read-modify-write `target` through `transport`'s shared documents until a write holds or `retries` run out.

    `sleep` waits between attempts (a step's stop-aware `ctx.sleep`); `shown` names the document in messages.
    """
    conflicts = 0
    while True:
        data, version = transport.read_document(target, limit)
        document = {} if data is None else parse_document(data, shown)
        before = None if data is None else _encoded(document, shown)
        change.apply(document)
        after = _encoded(document, shown)
        if after == before or (data is None and not document):  # nothing to remove from a missing document
            return Published(version, conflicts, is_changed=False)
        if len(after) > limit:
            raise PermanentError(f"{shown} would grow to {len(after)} bytes, more than the {limit} a shared "
                                 "document may hold")  # fmt: skip
        try:
            return Published(transport.write_document(target, after, version), conflicts, is_changed=True)
        except VersionConflict as exc:
            conflicts += 1
            if conflicts > retries:
                raise TransientError(f"{exc}; gave up after {retries} retries (another writer kept winning)") from None
        # Full jitter: writers that collided spread out instead of colliding again in step.
        sleep(_random.uniform(0, min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (conflicts - 1))))


def parse_document(data: bytes, shown: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        reason = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "unreadable"
        raise PermanentError(f"{shown} is not valid JSON ({reason}); it was left as it is") from None
    if not isinstance(document, dict):
        raise PermanentError(f"{shown} holds {json_kind(document)}, not a JSON object; publish only updates "
                             "objects, and it was left as it is")  # fmt: skip
    return document


def _encoded(document: dict[str, Any], shown: str) -> bytes:
    try:
        return encode_json(document)
    except RecursionError:
        raise PermanentError(f"{shown} is nested too deeply to be rewritten") from None


def _as_json(value: Any) -> Any:
    """A field's value as JSON holds it (a copy), or its text when JSON cannot hold it."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return str(value)


def json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {type(None): "null", str: "a string", int: "a number", float: "a number", list: "an array"}
    return names.get(type(value), "an object")


def shown_path(path: KeyPath) -> str:
    """A dotted path for a message; a level that holds a dot itself is bracketed, so the levels stay readable."""
    return shown_name(".".join(s if "." not in s and "[" not in s else f"[{json.dumps(s)}]" for s in path))


class Publish(Handler[PublishOptions]):
    name = "publish"
    Options = PublishOptions
    url_options = ("to",)

    def run(self, ctx: StepContext) -> StepResult:
        values = ctx.template_values()
        destination = render_url(self.options.to, values)
        url = parse_url(destination)
        if url.is_folder:
            raise PermanentError(f"{redact_url(destination)} ends in '/': a shared document needs a name")
        change = render_change(self.options, values)
        settings = {"endpoint_url": self.options.endpoint_url, "region": self.options.region,
                    "credential": self.options.credential, "connect_timeout": self.options.connect_timeout}  # fmt: skip
        transport = ctx.transport(destination, settings)
        shown = redact_url(str(url))
        ctx.check_stop()
        published = publish(transport, url.path, change, retries=self.options.retries, sleep=ctx.sleep, shown=shown)
        ctx.log.info("%s %s (version %s, %d conflicts)", "published to" if published.is_changed else "already in",
                     shown, published.version, published.conflicts)  # fmt: skip
        result = {"to": shown, "version": published.version, "conflicts": published.conflicts,
                  "changed": published.is_changed}  # fmt: skip
        return StepResult(result=result)
