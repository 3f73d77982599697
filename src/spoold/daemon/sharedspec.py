"""The options of a shared queue: `source: s3://bucket/prefix/`, `claim: {lease}`, `poll`, and the S3 options.

Kept apart from `config` (which needs this) and `shared` (which needs `Config`) so they do not import
each other. What a shared queue does is described in `shared`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spoold.errors import PermanentError
from spoold.options import Seconds
from spoold.transports.base import parse_url

# Below this a lease is shorter than a renewal round trip on a slow link plus the holder's safety margin.
MIN_LEASE_SECONDS = 5.0
DEFAULT_LEASE = Seconds(120)
DEFAULT_POLL = Seconds(2)


@dataclasses.dataclass(frozen=True)
class ClaimSpec:
    lease: Seconds = DEFAULT_LEASE

    def __post_init__(self) -> None:
        if self.lease < MIN_LEASE_SECONDS:
            raise ValueError(f"claim.lease must be at least {MIN_LEASE_SECONDS:g}s")


@dataclasses.dataclass(frozen=True)
class SharedSource:
    """Where a shared queue's items live and how this node reaches the store."""

    url: str
    bucket: str
    prefix: str  # ends with "/" unless the queue is the whole bucket ("")
    lease_seconds: float
    poll_seconds: float
    settings: dict[str, Any]

    def key(self, area: str, rest: str = "") -> str:
        """`<prefix><area>/<rest>`: area is inbox, claims, status, done or failed."""
        return f"{self.prefix}{area}/{rest}"


def shared_source(source: str | None, claim: ClaimSpec | None, poll: float, settings: dict[str, Any]) -> SharedSource:
    """Validate `source:` (raises ValueError with the reason)."""
    if source is None:
        raise ValueError("a shared queue needs `source: s3://bucket/prefix/`")
    try:
        parsed = parse_url(source)
    except PermanentError as exc:
        raise ValueError(str(exc)) from None
    if parsed.scheme != "s3" or not parsed.host:
        raise ValueError("source must be an s3:// URL: s3://bucket/prefix/")
    if not parsed.path.endswith("/"):
        raise ValueError("source must end with '/': it names a prefix under which inbox/, claims/, status/, "
                         "done/ and failed/ live")  # fmt: skip
    if poll < 0.1:
        raise ValueError("poll must be at least 100ms")
    lease = float((claim or ClaimSpec()).lease)
    return SharedSource(source, parsed.host, parsed.path.lstrip("/"), lease, float(poll), settings)
