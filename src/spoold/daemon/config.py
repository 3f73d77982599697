"""The configuration: one YAML file, validated once into a `Config` passed down explicitly.

Unknown keys are errors; every error names the file, the YAML path and the line.
Each step's options are validated by its handler's schema here, at load time.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from spoold.cache import Cache, CacheSpec
from spoold.daemon.conditions import When, build_when
from spoold.daemon.gatherspec import GatherSpec
from spoold.daemon.remotes import RemoteSpec, check_remote_names, resolve_step_options
from spoold.daemon.sharedspec import DEFAULT_POLL, ClaimSpec, SharedSource, shared_source
from spoold.daemon.yamlfile import load_yaml
from spoold.errors import ConfigError
from spoold.handlers import HANDLERS, handler_class
from spoold.handlers.base import Handler
from spoold.options import Builder, Bytes, Rate, Seconds, YamlPath
from spoold.templates import shadowed_builtins

DEFAULT_CONFIG_PATH = Path("/etc/spoold/spoold.yaml")
DEFAULT_IGNORE = ["*.part", "*.tmp", "*~"]
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

EMBEDDED_DEFAULT = """\
# spoold's embedded default: drop a file into ./spool/incoming/inbox/
spool: ./spool
queues:
  incoming:
    chain:
      - checksum: {algorithms: [sha256, xxh3_128]}
      - manifest: {}
      - forward: {to: outgoing}
  outgoing:
    chain:
      - ship: {to: 'file://./spool/shipped/'}
"""


@dataclasses.dataclass(frozen=True)
class FieldsSpec:
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    delays: list[Seconds] = dataclasses.field(default_factory=lambda: [Seconds(d) for d in (0, 5, 10, 20, 40)])

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry.attempts must be at least 1")
        if not self.delays:
            raise ValueError("retry.delays must list at least one duration")

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before 1-based `attempt`; the last delay repeats."""
        return float(self.delays[min(attempt - 1, len(self.delays) - 1)])


@dataclasses.dataclass(frozen=True)
class KeepPolicy:
    done: Seconds | Literal["delete"] = Seconds(7 * 86400)
    failed: Seconds | Literal["delete"] = Seconds(30 * 86400)
    # How long the sidecar of an item whose data is gone stays readable.
    status: Seconds = Seconds(7 * 86400)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what one producer's item may hold (SPEC section 10); each gives a clear rejection."""

    marker_bytes: Bytes = Bytes(1024**2)
    request_bytes: Bytes = Bytes(1024**2)
    depth: int = 32
    files: int = 100_000

    def __post_init__(self) -> None:
        if self.depth < 1 or self.files < 1:
            raise ValueError("limits.depth and limits.files must be at least 1")


@dataclasses.dataclass(frozen=True)
class QueueSpec:
    """The YAML shape of one queue; `chain` is validated step by step afterwards."""

    chain: list[Any]
    items: Literal["files", "bundles", "requests"] = "files"
    ready: Literal["marker", "settle"] = "marker"
    settle: Seconds = Seconds(1)
    concurrency: int = 1
    fields: FieldsSpec = FieldsSpec()
    retry: RetryPolicy = RetryPolicy()
    keep: KeepPolicy = KeepPolicy()
    ignore: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_IGNORE))
    limits: Limits = Limits()
    # Hold items until a group of them is whole, then run the chain once on the group (daemon/gather.py).
    gather: GatherSpec | None = None
    # A shared queue: its inbox is an S3 prefix that several nodes serve (daemon/shared.py).
    source: str | None = None
    claim: ClaimSpec | None = None
    poll: Seconds = DEFAULT_POLL
    endpoint_url: str | None = None
    region: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise ValueError("concurrency must be between 1 and 256")
        if self.source is None and (self.claim or self.endpoint_url or self.region or self.credential):
            raise ValueError("claim, endpoint_url, region and credential belong to a shared queue "
                             "(`source: s3://bucket/prefix/`)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    queues: dict[str, Any]
    spool: str = "/var/spool/spoold"
    min_free: Bytes = Bytes(0)
    rescan: Seconds = Seconds(60)
    group: str | None = None
    host: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    remotes: dict[str, RemoteSpec] = dataclasses.field(default_factory=dict)
    cache: CacheSpec | None = None
    # One cap on all the daemon's transfers together (ship, fetch, pull), beside each step's own `rate:`.
    rate: Rate | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    """One configured step: a handler instance plus where it came from."""

    index: int
    name: str
    handler: Handler[Any]
    # Checked when the step would start; when it does not hold, the step is recorded as skipped.
    when: When | None = None


@dataclasses.dataclass(frozen=True)
class Queue:
    name: str
    spec: QueueSpec
    steps: tuple[Step, ...]
    fields_pattern: re.Pattern[str] | None
    # Set when the queue's inbox is an S3 prefix shared with other nodes.
    shared: SharedSource | None = None

    @property
    def starts_early(self) -> bool:
        """Its first step starts on a bundle as soon as the bundle's folder appears, before the marker."""
        return self.steps[0].handler.starts_early


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    source: str
    spool: Path
    min_free_bytes: int
    rescan_seconds: float
    group: str | None
    host: str
    log_level: str
    queues: dict[str, Queue]
    # Kept for display only: steps already carry their remote's host and settings.
    remotes: dict[str, RemoteSpec] = dataclasses.field(default_factory=dict)
    # The node's download cache (`cache: {path, max}`), shared by every step that says `cache: true`.
    cache: Cache | None = None
    # The top-level `rate:` in bytes per second (`ratelimit.shared_bucket`), or None for no spool-wide cap.
    rate_bps: int | None = None


def load_config(path: Path | None) -> Config:
    """Load `path`, or /etc/spoold/spoold.yaml, or the embedded default when neither exists."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return parse_config(EMBEDDED_DEFAULT, "<embedded default>")
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(f"cannot read config: {reason}", file=str(path)) from None
    return parse_config(text, str(path))


def reload_problem(running: Config, new: Config) -> str | None:
    """Why `new` cannot replace the running config on SIGHUP, or None."""
    if new.spool.resolve() != running.spool.resolve():
        return "the spool folder cannot change on reload; restart spoold"
    for name, queue in new.queues.items():
        if name in running.queues and queue.shared != running.queues[name].shared:
            return (f"queue {name}: whether and where a queue is shared (source, claim, poll and the S3 options) "
                    "cannot change on reload; restart spoold")  # fmt: skip
    return None


def parse_config(text: str, file: str) -> Config:
    data, lines = load_yaml(text, file)
    builder = Builder(lines, file)
    if data is None:
        raise builder.error((), "the config is empty; it needs at least `queues:`")
    spec = builder.build(ConfigSpec, data, ())
    if not spec.queues:
        raise builder.error(("queues",), "no queues are defined")
    check_remote_names(builder, spec.remotes)
    queue_names = frozenset(spec.queues)
    queues: dict[str, Queue] = {}
    for name, raw in spec.queues.items():
        path: YamlPath = ("queues", name)
        if not QUEUE_NAME.match(name):
            raise builder.error(path, f"queue name {name!r} must be letters, digits, '_', '.' or '-'")
        if not isinstance(raw, dict):
            raise builder.error(path, "a queue must be a mapping with at least `chain:`")
        queue_spec = builder.build(QueueSpec, raw, path)
        steps = _build_chain(builder, queue_spec, (*path, "chain"), queue_names, spec.remotes)
        if queue_spec.gather is not None and steps[0].handler.starts_early:
            # Members never run the chain, so nothing could read a member's bundle while it arrives.
            raise builder.error((*path, "gather"), f"gather cannot be combined with {steps[0].name} starting "
                                "while a bundle is still arriving")  # fmt: skip
        pattern = re.compile(queue_spec.fields.pattern) if queue_spec.fields.pattern else None
        if pattern is not None and (shadowed := shadowed_builtins(pattern.groupindex)):
            raise builder.error((*path, "fields", "pattern"), f"group {', '.join(shadowed)} would shadow the "
                                "built-in template value of the same name; rename the group")  # fmt: skip
        if spec.cache is None and (user := next((s for s in steps if s.handler.uses_cache), None)):
            raise builder.error((*path, "chain", user.index, user.name, "cache"), "cache: true needs the top-level "
                                "`cache: {path, max}` (where the cache lives and how large it may grow)")  # fmt: skip
        queues[name] = Queue(name, queue_spec, steps, pattern, _shared(builder, queue_spec, path))
    _check_local_targets(builder, queues)
    return Config(
        source=file,
        spool=Path(spec.spool),
        min_free_bytes=int(spec.min_free),
        rescan_seconds=max(float(spec.rescan), 1.0),
        group=spec.group,
        host=spec.host or os.uname().nodename,
        log_level=spec.log_level,
        queues=queues,
        remotes=spec.remotes,
        cache=Cache.from_spec(spec.cache) if spec.cache else None,
        rate_bps=int(spec.rate) if spec.rate else None,
    )


def _check_local_targets(builder: Builder, queues: dict[str, Queue]) -> None:
    """Items reach a shared queue only through its inbox in the store, where every node sees them."""
    for queue in queues.values():
        for step in queue.steps:
            options = step.handler.options
            target = {"forward": getattr(options, "to", None), "fetch": getattr(options, "into", None),
                      "pull": str(getattr(options, "to", "")).removeprefix("queue:")}.get(step.name)  # fmt: skip
            shared = queues[target].shared if isinstance(target, str) and target in queues else None
            if shared is not None:
                raise builder.error(("queues", queue.name, "chain", step.index, step.name),
                                    f"{target} is a shared queue: feed it with `ship: {{to: "
                                    f"'{shared.url}inbox/'}}` so that every node sees the item")  # fmt: skip


def _shared(builder: Builder, spec: QueueSpec, path: YamlPath) -> SharedSource | None:
    if spec.source is None:
        return None
    if spec.gather is not None:
        raise builder.error((*path, "gather"), "a shared queue cannot gather: its items are held by many nodes")
    settings = {"endpoint_url": spec.endpoint_url, "region": spec.region, "credential": spec.credential}
    try:
        return shared_source(spec.source, spec.claim, float(spec.poll), settings)
    except ValueError as exc:
        raise builder.error((*path, "source"), str(exc)) from None


def _build_chain(
    builder: Builder, spec: QueueSpec, path: YamlPath, queue_names: frozenset[str], remotes: dict[str, RemoteSpec]
) -> tuple[Step, ...]:
    if not isinstance(spec.chain, list) or not spec.chain:
        raise builder.error(path, "chain must be a non-empty list of steps")
    steps = []
    for index, raw_step in enumerate(spec.chain):
        step_path: YamlPath = (*path, index)
        has_when = isinstance(raw_step, dict) and "when" in raw_step
        if isinstance(raw_step, str):
            name, options = raw_step, None
        elif isinstance(raw_step, dict) and len(raw_step) == 1 + has_when:
            name, options = next((k, v) for k, v in raw_step.items() if k != "when")
        else:
            raise _bad_step(builder, raw_step, step_path)
        if name not in HANDLERS:
            raise builder.error(
                (*step_path, str(name)), f"unknown handler {name!r}; known handlers: {', '.join(sorted(HANDLERS))}"
            )
        cls = handler_class(name)
        if options is not None and not isinstance(options, dict):
            if cls.shorthand is None:
                raise builder.error((*step_path, name), f"{name} takes a mapping of options")
            options = {cls.shorthand: options}
        # Before the options are built, so a step's own options override its remote's and are validated alike.
        options = resolve_step_options(builder, remotes, cls, options, (*step_path, name))
        handler = cls(builder.build(cls.Options, options, (*step_path, name)))
        problem = handler.validate(queue_names, spec.items == "requests")
        if problem:
            raise builder.error((*step_path, name), problem)
        if handler.starts_early and (index or spec.items != "bundles" or spec.ready != "marker"):
            raise builder.error((*step_path, name), f"{name} can start while a bundle is still arriving only as "
                                "the first step of a queue with `items: bundles` and `ready: marker`")  # fmt: skip
        when = build_when(builder, raw_step["when"], (*step_path, "when")) if has_when else None
        steps.append(Step(index, name, handler, when))
    return tuple(steps)


def _bad_step(builder: Builder, raw_step: object, path: YamlPath) -> ConfigError:
    """The error for a step that is not one handler (plus `when:`), naming a stray key when there is one."""
    if isinstance(raw_step, dict):
        stray = [k for k in raw_step if k not in HANDLERS and k != "when"]
        if len(stray) == 1 and len(raw_step) - len(stray) == 1 + ("when" in raw_step):
            close = difflib.get_close_matches(str(stray[0]), ["when"], n=1)
            hint = "; did you mean 'when'?" if close else "; only `when:` may stand beside the handler"
            return builder.error((*path, str(stray[0])), f"unknown key {stray[0]!r} beside the step's handler{hint}")
    return builder.error(path, "a step is one `handler: {options}` mapping, optionally with `when: {conditions}` "
                         "beside it")  # fmt: skip
