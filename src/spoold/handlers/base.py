"""What a handler is, and what it is given.

A handler is one kind of step. It declares its options as a dataclass
(`Options`), gets a `StepContext` from the daemon and returns a `StepResult`.
It knows nothing of watching, claiming or scheduling: everything it may touch
comes through the context. It must be resumable or idempotent: after `kill -9`
at any instant the daemon runs it again with the checkpoint it last saved.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from spoold.cache import Cache
from spoold.ratelimit import Limiter

ItemKind = Literal["file", "bundle", "request"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a handler that takes none."""


@dataclasses.dataclass
class StepResult:
    """What a finished step hands back to the chain.

    `outputs` replaces the payload (encode: the videos replace the frames);
    `extras` are files added beside it (a manifest, a checksum file), all inside
    the item's work folder. `fields` are merged into the item's fields.
    """

    result: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: list[Path] | None = None
    extras: list[Path] = dataclasses.field(default_factory=list)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_payload_removed: bool = False


class Checkpoint(Protocol):
    """A step's resumable state, kept in its sidecar entry."""

    data: dict[str, Any]

    def save(self) -> None:
        """Write `data` to the sidecar durably, now."""


class ArrivingBundle(Protocol):
    """A bundle still being written into the inbox, given to a step that starts early.

    The producer has not written its ready marker yet. `root_fd` is the bundle
    folder, open: it stays valid when the marker arrives and the daemon moves the
    folder into the item's work folder, so a step reads it through the descriptor
    (`os.open(name, flags, dir_fd=...)`) and never by path.
    """

    root_fd: int

    def take_landed(self) -> list[str]:
        """Paths (relative to the bundle) closed after writing or moved in since the last call."""

    def wait(self, timeout: float) -> None:
        """Return when something lands, the bundle is complete, or `timeout` passes; `Interrupted` on stop."""

    def is_complete(self) -> bool:
        """The ready marker arrived: the bundle is whole and is `payload[0]` now."""

    def wait_complete(self) -> None:
        """Block until the ready marker arrives; `Interrupted` on stop or if the bundle left the inbox."""


class StepContext(Protocol):
    """Everything a running step may see or do; implemented by the daemon."""

    queue: str
    item: str
    kind: ItemKind
    item_dir: Path
    payload: list[Path]
    extras: list[Path]
    fields: dict[str, Any]
    # relative path -> {algorithm: hex}; the checksum step fills it, ship verifies with it.
    digests: dict[str, dict[str, str]]
    checkpoint: Checkpoint
    # The config's `min_free`: steps that fill the disk (fetch) wait rather than go below it.
    min_free_bytes: int
    log: logging.LoggerAdapter[logging.Logger]
    # Set only for a step that starts early (`starts_early`) while its bundle is still arriving.
    arriving: ArrivingBundle | None

    @property
    def cache(self) -> Cache | None:
        """The node's download cache (the config's top-level `cache:`), or None when it has none."""

    def template_values(self) -> dict[str, Any]:
        """Built-ins (`name`, `stem`, `ext`, `queue`, `host`, `date`, `path`, `item_dir`, digests) and fields."""

    def render(self, template: str) -> str:
        """Fill `{field}` placeholders from `template_values()`; refuses values that escape a path."""

    def progress(self, done: int, total: int | None, **extra: Any) -> None:
        """Report progress (`total` None when nobody knows it); written to the sidecar at most once a second."""

    def waiting(self, message: str, next_check_in_seconds: float) -> None:
        """Say the step is polling something remote; the sidecar shows `waiting`."""

    def sleep(self, seconds: float) -> None:
        """Sleep, but raise `Interrupted` at once if the daemon is stopping."""

    def check_stop(self) -> None:
        """Raise `Interrupted` if the daemon is stopping."""

    def limiter(self, rate_bps: int | None) -> Limiter:
        """The pace of this step's transfers: its own `rate:` (None for none) and the spool's; stops on stop."""

    def transport(self, url: str, settings: Mapping[str, Any]) -> Any:
        """A connected transport for `url` (shared per destination), see `spoold.transports`."""

    def hand_over(self, queue: str, paths: list[Path], fields: Mapping[str, Any], name: str | None = None) -> str:
        """Make `paths` a new item of local `queue` with `fields`; idempotent per call site. Returns the new name."""

    def free_bytes(self) -> int:
        """Free bytes on the spool's filesystem."""


OptionsT = TypeVar("OptionsT")


class Handler(ABC, Generic[OptionsT]):
    """One kind of step. Subclasses set `name`, `Options` and implement `run`."""

    name: ClassVar[str]
    Options: ClassVar[type[Any]] = NoOptions
    # A step written as `- forward: outgoing` sets this option to the scalar.
    shorthand: ClassVar[str | None] = None
    # Options whose value is a URL (or a list of mappings holding them) that may name a top-level remote:
    # the config loader rewrites `sftp://edge/...` to the remote's host and adds its settings before
    # `Options` is built, so the handler only ever sees ordinary URLs.
    url_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: OptionsT) -> None:
        self.options = options

    @property
    def starts_early(self) -> bool:
        """Whether this step may start on a bundle still arriving (only as a queue's first step)."""
        return False

    @property
    def uses_cache(self) -> bool:
        """Whether this step needs the config's top-level `cache:` (checked when the config is loaded)."""
        return False

    def validate(self, queue_names: frozenset[str], is_queue_of_requests: bool) -> str | None:
        """Cross-check against the whole config; return an error message or None."""
        return None

    @abstractmethod
    def run(self, ctx: StepContext) -> StepResult:
        """Do the step's work on `ctx.payload`; raise a `StepError` on failure."""


HandlerFactory = Callable[[Any], Handler[Any]]
