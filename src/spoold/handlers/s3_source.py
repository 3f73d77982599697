"""What `pull` and `fetch` share to read from s3://: the S3 options, and one object fetched into a file.

The options are `ship`'s (`endpoint_url`, `region`, `part_size`, `concurrency`;
`credential` and `connect_timeout` come with each handler's connection options),
so one node names its store the same way in both directions. The download itself
is the S3 transport's `get_tree` (parallel ranged GETs, resumable, verified
against the sha256 the object records).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spoold.errors import PermanentError, RemoteMissing
from spoold.handlers.base import StepContext
from spoold.options import Bytes
from spoold.ratelimit import Limiter
from spoold.transports.base import TransferContext, parse_url, redact_url

S3_SCHEME = "s3"


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3SourceOptions:
    """How a step reads from S3; the same names and defaults as `ship`'s."""

    endpoint_url: str | None = None
    region: str | None = None
    part_size: Bytes = Bytes(64 << 20)
    concurrency: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise ValueError("concurrency must be between 1 and 64")
        # Ranged GETs have no minimum size, but each costs a request: below 1MiB they cost more than they bring.
        if self.part_size < 1 << 20:
            raise ValueError("part_size must be at least 1MiB")

    def s3_settings(self) -> dict[str, Any]:
        """These options as transport settings (merged with the step's connection settings)."""
        return {"endpoint_url": self.endpoint_url, "region": self.region, "part_size": int(self.part_size),
                "concurrency": self.concurrency}  # fmt: skip


def is_s3_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == S3_SCHEME if "://" in url else False


def object_name(url: str) -> str:
    """The last segment of an `s3://bucket/key` URL's key (where `?` and `#` are ordinary characters)."""
    return parse_url(url).path.rsplit("/", 1)[-1]


def download_object(
    ctx: StepContext, url: str, settings: dict[str, Any], part: Path, state: dict[str, Any],
    report: Callable[[int, int | None], None], limiter: Limiter,
) -> None:  # fmt: skip
    """The object at `url` into the file `part`, resuming from `state["s3"]` (a fetch request's per-file state).

    `report(done, size)` hears the bytes so far and the object's size; `limiter` paces the download.
    """
    parsed = parse_url(url)
    shown = redact_url(url)
    if parsed.is_folder:
        raise PermanentError(f"{shown}: a fetch request lists objects, not prefixes")
    transport = ctx.transport(url, settings)
    found = transport.stat(parsed.path)
    if found is None:
        raise RemoteMissing(f"{shown}: no such object")
    if found.is_dir:
        raise PermanentError(f"{shown} is a prefix, not an object; a fetch request lists objects")
    report(0, found.size)
    transfer = TransferContext(
        progress=report, checkpoint=state.setdefault("s3", {}),
        save_checkpoint=ctx.checkpoint.save, check_stop=ctx.check_stop, limiter=limiter,
    )  # fmt: skip
    transport.get_tree(parsed.path, part.parent, transfer, name=part.name)
    state.pop("s3", None)
