"""ship: deliver the payload, and the files beside it, to `file://`, `sftp://` or `s3://`.

Options: `to` (URL template; ending in `/` means a folder where the item keeps
its name), `identity`, `password_file`, `known_hosts`, `host_key`,
`connect_timeout` (SFTP), `endpoint_url`, `region`, `credential`, `part_size`,
`concurrency` (S3), `verify` (default true), `delete_source` (remove the local
payload once every copy is verified), `rate` (a cap on this step's bandwidth, such
as `2MiB/s`; the config's top-level `rate:` caps all transfers together), `ready_marker` (write `<name>.ready`
holding the item's fields as JSON after everything else; default on for folder
payloads and for another spool's inbox, off otherwise).

Node to node: a folder destination whose last segment is `inbox` is taken for
another spool's inbox, and there (or anywhere with `ready_marker: true`) the
item travels as one unit, so the far spool sees one item with the sender's
fields: a payload with extras (a manifest, a `.sha256` file) goes as one
folder named after the item holding the payload and the extras, then
`<item>.ready`; a lone file or folder goes as it is, then `<name>.ready`. The
far queue must be `items: bundles` to take such a folder. Elsewhere, and with
`ready_marker: false`, the extras land beside the payload as separate files;
several payload files always travel as one folder named after the item.

Each target is published atomically by its transport (temp name then rename,
or multipart completion) and verified against the digests the checksum step
recorded (every algorithm it computed: an SFTP far host with `xxh128sum` is
checked against the xxh3_128 of `checksum: {algorithms: [sha256, xxh3_128]}`
with nothing hashed again here); finished targets are recorded in the
checkpoint, so a re-run sends only what is left, and the marker is written once.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spoold.errors import PermanentError
from spoold.fsio import encode_json
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.options import Bytes, Rate
from spoold.templates import render_url
from spoold.transports import TRANSPORTS
from spoold.transports.base import ConnectionOptions, Delivered, TransferContext, join_name, parse_url, redact_url

STAGING_DIR = ".ship"
READY_SUFFIX = ".ready"
# A folder destination named so is taken for another spool's inbox (`<spool>/<queue>/inbox/`).
INBOX = "inbox"
_NOT_TRANSPORT_SETTINGS = ("to", "verify", "delete_source", "ready_marker", "rate")


@dataclasses.dataclass(frozen=True)
class ShipOptions(ConnectionOptions):
    to: str
    endpoint_url: str | None = None
    region: str | None = None
    part_size: Bytes = Bytes(64 << 20)
    concurrency: int = 4
    verify: bool = True
    delete_source: bool = False
    ready_marker: bool | None = None
    rate: Rate | None = None

    def __post_init__(self) -> None:
        scheme = self.to.split("://", 1)[0].lower() if "://" in self.to else ""
        if scheme not in TRANSPORTS:
            raise ValueError(f"to: {redact_url(self.to)!r} must start with one of "
                             f"{', '.join(s + '://' for s in sorted(TRANSPORTS))}")  # fmt: skip
        if "@" in self.to.split("://", 1)[1].split("/", 1)[0] and ":" in self.to.split("://", 1)[1].split("@")[0]:
            raise ValueError("to: never put a password in the URL; use password_file or credential")
        if not 1 <= self.concurrency <= 64:
            raise ValueError("concurrency must be between 1 and 64")
        if self.part_size < 5 << 20:
            raise ValueError("part_size must be at least 5MiB (the S3 minimum)")


def transport_settings(options: Any) -> dict[str, Any]:
    """The options a transport needs to connect, as a plain mapping (shared by ship, wait and pull)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in _NOT_TRANSPORT_SETTINGS}


@dataclasses.dataclass(frozen=True)
class Target:
    source: Path
    remote: str
    known: dict[str, str]  # a file's digests by algorithm, from the checksum step
    tree_digests: dict[str, dict[str, str]]  # a folder's: relpath -> digests by algorithm


class Ship(Handler[ShipOptions]):
    name = "ship"
    Options = ShipOptions
    url_options = ("to",)
    shorthand = "to"

    def run(self, ctx: StepContext) -> StepResult:
        # Field values are escaped into the URL and the result is checked against the literal base.
        destination = render_url(self.options.to, ctx.template_values())
        url = parse_url(destination)
        if ctx.checkpoint.data.get("summary"):
            # Everything was delivered before a restart; only the source removal may be left.
            return self._finish(ctx, ctx.checkpoint.data["summary"])
        transport = ctx.transport(destination, transport_settings(self.options))
        targets, should_mark = self._plan(ctx, url.path, url.is_folder, url.scheme)
        total = sum(_size(t.source) for t in targets)
        finished: dict[str, dict[str, Any]] = ctx.checkpoint.data.setdefault("finished", {})
        done_bytes = sum(_size(t.source) for t in targets if t.remote in finished)
        delivered: list[Delivered] = []
        limiter = ctx.limiter(self.options.rate)
        pending = [t for t in targets if t.remote not in finished]
        is_marking = should_mark and not ctx.checkpoint.data.get("marked")
        for target in pending:
            ctx.check_stop()
            transfer = TransferContext(
                progress=_offset_progress(ctx, done_bytes, total),
                checkpoint=ctx.checkpoint.data.setdefault("transfer", {}).setdefault(target.remote, {}),
                save_checkpoint=ctx.checkpoint.save,
                check_stop=ctx.check_stop,
                limiter=limiter,
            )
            if target.source.is_dir():
                result = transport.put_tree(target.source, target.remote, target.tree_digests, transfer)
            else:
                known = target.known if self.options.verify else {}
                result = transport.put_file(target.source, target.remote, known, transfer)
            delivered.append(result)
            finished[target.remote] = {"bytes": result.size, "verified": result.is_verified}
            ctx.checkpoint.data.get("transfer", {}).pop(target.remote, None)
            if target is not pending[-1] or is_marking:
                # The last one needs no write of its own: the summary's comes next, with nothing done between.
                ctx.checkpoint.save()
            done_bytes += _size(target.source)
            ctx.progress(done_bytes, total)
        main = targets[0].remote if targets else url.path
        if is_marking:
            # Last, once everything is in place: a far spool claims the item (and drops the marker) when it appears.
            transport.write_small(main.rstrip("/") + READY_SUFFIX, encode_json(ctx.fields, indent=None))
            ctx.checkpoint.data["marked"] = True  # written with the summary, next, with nothing done between
        verified = all(v.get("verified") for v in finished.values())
        summary = {
            "to": redact_url(str(url)), "targets": sorted(finished), "bytes": total, "verified": verified,
            "remote_path": main,
        }  # fmt: skip
        ctx.checkpoint.data["summary"] = summary
        if is_marking or self.options.delete_source:
            # What comes next cannot be undone (the source's removal; a far spool claiming the item at its
            # marker): a re-run must only finish. Otherwise the step's end is the next write, and a re-run
            # after a crash before it sends the same bytes again.
            ctx.checkpoint.save()
        return self._finish(ctx, summary)

    def _finish(self, ctx: StepContext, summary: dict[str, Any]) -> StepResult:
        shutil.rmtree(ctx.item_dir / STAGING_DIR, ignore_errors=True)
        if self.options.delete_source:
            for path in ctx.payload:
                _remove(path)
        return StepResult(result=summary, is_payload_removed=self.options.delete_source)

    def _plan(self, ctx: StepContext, path: str, is_folder: bool, scheme: str) -> tuple[list[Target], bool]:
        """Which local file or folder goes to which remote path, and whether a ready marker follows."""
        payload = [p for p in ctx.payload if p.exists() or p.is_symlink()]
        if len(payload) != len(ctx.payload):
            raise PermanentError("payload files are missing from the item's folder")
        if not payload and not ctx.extras:
            raise PermanentError("nothing to ship: the item has no payload")
        is_inbox = is_folder and posixpath.basename(path.rstrip("/")) == INBOX
        is_tree = len(payload) > 1 or (bool(payload) and payload[0].is_dir())
        should_mark = self.options.ready_marker if self.options.ready_marker is not None else is_inbox or is_tree
        # Another spool's inbox would take each file beside the payload for an item of its own.
        is_unit = should_mark and (is_inbox or self.options.ready_marker is True)
        if is_unit and ctx.extras and len(payload) == 1 and payload[0].is_dir():
            # A bundle keeps its shape: its extras join its folder, so a far `*/*.png` still finds the frames.
            relative = str(payload[0].relative_to(ctx.item_dir))
            stage = self._stage(ctx, [*sorted(payload[0].iterdir()), *ctx.extras])
            digests = self._tree_digests(ctx, payload, strip=relative)
            for extra in ctx.extras:
                if known := _known(ctx.digests.get(str(extra.relative_to(ctx.item_dir)))):
                    digests[extra.name] = known
            return [Target(stage, join_name(path, ctx.item, scheme), {}, digests)], should_mark
        if len(payload) > 1 or (is_unit and ctx.extras):
            # Several outputs (e.g. one video per camera), or a payload with its extras, travel as one folder
            # named after the item.
            stage = self._stage(ctx, payload + ctx.extras)
            remote = join_name(path, ctx.item, scheme) if is_folder else path.rstrip("/")
            return [Target(stage, remote, {}, self._tree_digests(ctx, payload + ctx.extras))], should_mark
        targets: list[Target] = []
        folder = path if is_folder else os.path.dirname(path.rstrip("/")) or "/"
        if payload:
            source = payload[0]
            # A claimed file is named after its item; a step's output (an archive) keeps its own name.
            remote = join_name(path, source.name, scheme) if is_folder else path
            relative = str(source.relative_to(ctx.item_dir))
            if source.is_dir():
                targets.append(Target(source, remote, {}, self._tree_digests(ctx, [source], strip=relative)))
            else:
                targets.append(Target(source, remote, _known(ctx.digests.get(relative)), {}))
        for extra in ctx.extras:
            targets.append(Target(extra, join_name(folder, extra.name, scheme), {}, {}))
        return targets, should_mark

    @staticmethod
    def _stage(ctx: StepContext, paths: list[Path]) -> Path:
        stage = ctx.item_dir / STAGING_DIR / ctx.item
        shutil.rmtree(stage.parent, ignore_errors=True)
        stage.mkdir(parents=True)
        names = [path.name for path in paths]
        if len(set(names)) != len(names):
            clash = next(name for name in names if names.count(name) > 1)
            raise PermanentError(f"two files named {clash!r} would travel in one folder (the payload and an "
                                 "extra); rename one")  # fmt: skip
        for path in paths:
            target = stage / path.name
            if path.is_dir():
                shutil.copytree(path, target, copy_function=os.link)
            else:
                os.link(path, target)
        return stage

    @staticmethod
    def _tree_digests(ctx: StepContext, paths: list[Path], strip: str = "") -> dict[str, dict[str, str]]:
        """Digests by algorithm per file relative to the delivered folder, from what the checksum step recorded."""
        digests: dict[str, dict[str, str]] = {}
        for relative, by_algorithm in ctx.digests.items():
            if strip:
                if relative.startswith(strip + "/"):
                    digests[relative[len(strip) + 1 :]] = _known(by_algorithm)
            else:
                digests[relative] = _known(by_algorithm)
        del paths
        return digests


def _known(by_algorithm: object) -> dict[str, str]:
    """A file's digests by algorithm as the sidecar holds them; what a hand edit left malformed is not known."""
    if not isinstance(by_algorithm, dict):
        return {}
    return {k: v for k, v in by_algorithm.items() if isinstance(k, str) and isinstance(v, str)}


def _offset_progress(ctx: StepContext, base: int, total: int) -> Callable[[int, int], None]:
    def report(done: int, _target_total: int) -> None:
        ctx.progress(base + done, total)

    return report


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
