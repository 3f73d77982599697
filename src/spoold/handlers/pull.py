"""pull: download a remote file or folder (recursively, resumably) into a local folder or another queue.

Options: `from` (URL template of a remote file or folder), `to` (a `file://`
URL template: ending in `/` it is a folder where what is pulled keeps its
name; otherwise the exact path that receives the file, or the folder's
contents, as in `file:///models/{repo_id}`; or `queue:NAME` to make it a new
item of that queue with this item's fields), `rate` (a cap on this step's
bandwidth, such as `2MiB/s`, beside the config's spool-wide `rate:`), `limits`
(`{depth: 32, files: 100000}`: how many levels below the root and how many
files and folders a pulled tree may hold; the defaults are those of a queue's `limits`), and the connection
options `identity`, `password_file`, `credential`, `known_hosts`, `host_key`,
`connect_timeout`; for s3:// also `endpoint_url`, `region`, `part_size` and
`concurrency` (as for `ship`: objects of `part_size` or more go by that many
parallel ranged GETs) and `cache` (true: objects whose content the node's
top-level `cache:` holds are hard-linked from it instead of downloaded, and
downloads are added to it; other schemes ignore it).

The server is untrusted (SPEC section 10): its whole listing is checked
before anything is downloaded, and a name that is not one path component
(empty, `.`, `..`, a `/`, a NUL, over 255 bytes, not UTF-8), a symlink or
special file below the root (never followed or read), or a tree past
`limits` fails the step permanently, naming the entry. Files land through
descriptors under the landing folder, never through a link found there.

Field values in `to` are escaped and kept inside its literal base
(`templates.render_url`), so a field such as `../x` is refused.

Side effects: the download is written under `.<name>.spoold.part` beside the
target and renamed into place when complete, so whoever watches the target sees
only whole trees; a re-run continues partial files and then replaces an earlier
copy whole. A pulled file never replaces a folder, nor a folder a file. With
`queue:NAME` the tree is fetched into the item's work folder and handed over
exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

from spoold.errors import PermanentError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.s3_source import S3SourceOptions, is_s3_url
from spoold.options import Rate
from spoold.templates import render_url
from spoold.transports.base import (
    ConnectionOptions,
    TransferContext,
    TreeLimits,
    check_component,
    parse_url,
    redact_url,
)

QUEUE_PREFIX = "queue:"


@dataclasses.dataclass(frozen=True)
class PullOptions(ConnectionOptions, S3SourceOptions):
    from_: str = dataclasses.field(metadata={"key": "from"})
    to: str
    limits: TreeLimits = TreeLimits()
    cache: bool = False
    rate: Rate | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # A whole URL may come from a field (field note 003: `from: '{dataset}'`); it is checked once rendered.
        if "://" not in self.from_ and not self.from_.startswith("{"):
            raise ValueError(f"from: {self.from_!r} must be a URL such as sftp://host/path/ or a {{field}} holding one")
        if not (self.to.startswith("file://") or self.to.startswith(QUEUE_PREFIX)):
            raise ValueError(f"to: {self.to!r} must be a local file:// folder or path, or queue:NAME")


class Pull(Handler[PullOptions]):
    name = "pull"
    Options = PullOptions
    url_options = ("from",)

    @property
    def uses_cache(self) -> bool:
        return self.options.cache

    def validate(self, queue_names: frozenset[str], is_queue_of_requests: bool) -> str | None:
        queue = self.options.to[len(QUEUE_PREFIX) :] if self.options.to.startswith(QUEUE_PREFIX) else None
        if queue is not None and queue not in queue_names:
            return f"pull to {self.options.to!r}: no such queue; queues: {', '.join(sorted(queue_names))}"
        return None

    def run(self, ctx: StepContext) -> StepResult:
        source = ctx.render(self.options.from_)
        url = parse_url(source)
        shown = redact_url(source)
        if url.scheme == "file" and not self.options.from_.lower().startswith("file://"):
            # Fields are the producer's: they may name a remote dataset, never a local path to copy out.
            raise PermanentError(f"pull from {shown}: a file:// source must be written in the config, not come "
                                 "from a field")  # fmt: skip
        queue = self.options.to[len(QUEUE_PREFIX) :] if self.options.to.startswith(QUEUE_PREFIX) else None
        result: dict[str, Any] | None = ctx.checkpoint.data.get("landed")
        if result is None:
            # For a queue the tree lands in this item's folder, so the handover links it under its own name.
            folder, name = (ctx.item_dir, None) if queue else _landing(self.options.to, ctx)
            settings, extra = self.options.connection_settings(), {}
            if is_s3_url(source):
                settings.update(self.options.s3_settings())
                # Only S3 names an object's content before it is downloaded, so only S3 reads the cache.
                extra = {"cache": ctx.cache} if self.options.cache else {}
            transport = ctx.transport(source, settings)
            transfer = TransferContext(
                progress=ctx.progress,
                checkpoint=ctx.checkpoint.data.setdefault("transfer", {}),
                save_checkpoint=ctx.checkpoint.save,
                check_stop=ctx.check_stop,
                limiter=ctx.limiter(self.options.rate),
            )
            landed = transport.get_tree(url.path, folder, transfer, name=name, limits=self.options.limits, **extra)
            if not landed:
                raise PermanentError(f"nothing was downloaded from {shown}")
            result = {"from": shown, "to": [str(p) for p in landed], "bytes": sum(_size(p) for p in landed)}
            ctx.checkpoint.data.pop("transfer", None)
            ctx.checkpoint.data["landed"] = result
            ctx.checkpoint.save()
        if queue is not None:
            paths = [Path(p) for p in result["to"]]
            result = {**result, "queue": queue, "item": ctx.hand_over(queue, paths, ctx.fields, name=paths[0].name)}
        ctx.log.info("pulled %s into %s", shown, result.get("item") or result["to"][0])
        return StepResult(result=result)


def _landing(template: str, ctx: StepContext) -> tuple[Path, str | None]:
    """(local folder, name to land under) for a `file://` `to`: a folder keeps the pulled name; else the exact path."""
    # render_url escapes each value and keeps the path inside the template's literal base: `../x` is refused.
    path = parse_url(render_url(template, ctx.template_values())).path
    if path.endswith("/"):
        return Path(path), None
    folder, name = os.path.split(path)
    return Path(folder or "."), check_component(name, f"pull to {redact_url(template)}")


def _size(path: Path) -> int:
    """Bytes of the regular files at or below `path`, never following a link."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total
