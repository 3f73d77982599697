"""manifest: a JSON description of the item beside it.

Options: `layout` (`spoold`, the generic layout), `name` (template, default
`{name}.manifest.json`; it renders to one file name inside the item's folder,
never a path out of it, and never one of the payload's own files), `fields`
(extra static fields merged in).
The generic layout holds the item's fields, every payload file with its size and
checksums, the host and the times. Side effects: one extra file.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from spoold import __version__
from spoold.errors import PermanentError, TemplateError
from spoold.fsio import encode_json, now_iso
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.checksum import payload_files
from spoold.templates import render_path, template_fields

LAYOUT_SCHEMA = "spoold.manifest/1"


@dataclasses.dataclass(frozen=True)
class ManifestOptions:
    layout: Literal["spoold", "soccer-rig"] = "spoold"
    name: str = "{name}.manifest.json"
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


# Extra per-file facts by file suffix (the media handlers add video metadata here).
FILE_DESCRIBERS: dict[str, Callable[[Path], dict[str, Any]]] = {}


def describe_file(ctx: StepContext, path: Path) -> dict[str, Any]:
    relative = str(path.relative_to(ctx.item_dir))
    entry: dict[str, Any] = {"path": relative, "size_bytes": path.stat().st_size}
    entry.update(ctx.digests.get(relative, {}))
    describer = FILE_DESCRIBERS.get(path.suffix.lower())
    if describer is not None:
        entry.update(describer(path))
    return entry


def generic_manifest(ctx: StepContext, static_fields: dict[str, Any]) -> dict[str, Any]:
    files = [describe_file(ctx, p) for p in payload_files(ctx)]
    return {
        "schema": LAYOUT_SCHEMA,
        "item": ctx.item,
        "queue": ctx.queue,
        "kind": ctx.kind,
        "fields": {**ctx.fields, **static_fields},
        "files": files,
        "total_bytes": sum(f["size_bytes"] for f in files),
        "host": ctx.render("{host}"),
        "generated": now_iso(),
        "spoold_version": __version__,
    }


LAYOUTS: dict[str, Callable[[StepContext, dict[str, Any]], dict[str, Any]]] = {"spoold": generic_manifest}


class Manifest(Handler[ManifestOptions]):
    name = "manifest"
    Options = ManifestOptions

    def validate(self, queue_names: frozenset[str], is_queue_of_requests: bool) -> str | None:
        if "/" in self.options.name:
            return "manifest name must be a file name, not a path"
        try:
            template_fields(self.options.name)
        except TemplateError as exc:
            return str(exc)
        if self.options.layout not in LAYOUTS:
            return f"manifest layout {self.options.layout!r} is not available in this version"
        return None

    def run(self, ctx: StepContext) -> StepResult:
        document = LAYOUTS[self.options.layout](ctx, dict(self.options.fields))
        target = render_path(self.options.name, ctx.template_values(), ctx.item_dir)
        if any(target == p or p in target.parents for p in ctx.payload):
            raise TemplateError(f"manifest name {target.name!r} would overwrite the item's payload")
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            tmp.write_bytes(encode_json(document))
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise PermanentError(f"manifest name {target.name!r} is too long for the file system") from None
            raise
        os.replace(tmp, target)
        return StepResult(result={"manifest": target.name}, extras=[target])


# Video facts and the 002 layout live in the media modules, imported only when a manifest needs them.
def _describe_video(path: Path) -> dict[str, Any]:
    from spoold.media import describe_video

    return describe_video(path)


def _soccer_rig_manifest(ctx: StepContext, static_fields: dict[str, Any]) -> dict[str, Any]:
    from spoold.handlers.soccer_rig import soccer_rig_manifest

    return soccer_rig_manifest(ctx, static_fields)


FILE_DESCRIBERS.update(dict.fromkeys((".mp4", ".mov", ".mkv", ".avi"), _describe_video))
LAYOUTS["soccer-rig"] = _soccer_rig_manifest
