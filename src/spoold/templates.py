"""`{field}` templates for destinations, local paths, argv and environment values.

Field values are untrusted (they come from producers' names, markers and requests, and from
remote sidecars and listings), so each place a template is rendered into has its own function
with its own rules; the literal text of a template is the config author's and is kept as written:

- `render_url(template, values)`: a destination or source URL. Values are percent-escaped, so
  `#`, `?`, `%`, spaces and non-UTF-8 bytes stay part of the path and two different values never
  give one path; a value in the host part must look like a host name; the rendered path may not
  hold a `..` segment after any decoding and stays inside the template's literal base (the part
  before the first `{`). A value may hold `/` (a remote folder from `wait`'s `found`, a
  `model_dir` from a far sidecar), but none of its segments may be `.` or `..`.
- `render_path(template, values, base)`: a relative path inside a local folder (`manifest`'s
  `name`). Each value is one path component (no `/`); never absolute, never out of `base`.
- `render_arg(template, values)`: one argv element for `exec`. Verbatim (there is no shell), but
  an element whose first character comes from a value and is `-` is refused unless the step
  allows it, so an item named `--help` never becomes an option.
- `render_text(template, values)`: plain text (an environment value). Verbatim, NUL refused.

Every function refuses a NUL in a value and reports problems as `TemplateError`.
"""

from __future__ import annotations

import os
import posixpath
import re
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from spoold.errors import PermanentError, TemplateError
from spoold.transports.base import fits_scheme, fully_decoded, has_dotdot, parse_url

_formatter = string.Formatter()

DIGEST_NAMES: frozenset[str] = frozenset({"sha256", "xxh3_128", "xxh64", "md5"})
# Every value `ItemContext.template_values` provides itself. A field (from a producer, a remote
# sidecar or a step) with one of these names never overrides it; the claim rejects such items.
BUILTIN_NAMES: frozenset[str] = frozenset({
    "name", "stem", "ext", "queue", "host", "date", "original_name", "item", "item_dir", "path",
}) | DIGEST_NAMES  # fmt: skip

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_VALUE = re.compile(r"^[A-Za-z0-9._~:\[\]-]+$")
_GLOB_MAGIC = re.compile(r"([*?\[])")
MAX_COMPONENT_BYTES = 255  # a file or folder name on Linux and over SFTP
MAX_S3_KEY_BYTES = 1024

Chunk = tuple[str, str | None, str]


def shadowed_builtins(fields: Mapping[str, Any]) -> list[str]:
    """The names in `fields` that are built-in template values (sorted); an item carrying any is rejected."""
    return sorted(name for name in fields if name in BUILTIN_NAMES)


def template_fields(template: str) -> list[str]:
    """The field names a template uses; raises TemplateError on malformed braces."""
    return [name for _, name, _ in _chunks(template) if name is not None]


def is_url_template(template: str) -> bool:
    """Whether `template` begins with a literal `scheme://`, so it must be rendered with `render_url`."""
    return _URL_SCHEME.match(template) is not None


def _fill(template: str, values: Mapping[str, Any], check: Callable[[str, str, str], None] | None = None) -> str:
    """Fill `template`; `check(name, value, text so far)` may refuse each value. A NUL is always refused."""
    out: list[str] = []
    for literal, name, spec in _chunks(template):
        out.append(literal)
        if name is None:
            continue
        text = _no_nul(name, _value(template, name, spec, values))
        if check is not None:
            check(name, text, "".join(out))
        out.append(text)
    return "".join(out)


def render_text(template: str, values: Mapping[str, Any]) -> str:
    """Fill `template` verbatim (environment values, messages); a value holding a NUL is refused."""
    return _fill(template, values)


def render(template: str, values: Mapping[str, Any], *, is_path: bool = True) -> str:
    """Fill `template` from `values`; with `is_path`, refuse a value with a `..` segment after any decoding.

    Only plain names are allowed (no `{a.b}` or `{a[0]}`), so a template cannot reach into objects.
    Prefer the specific functions (`render_url`, `render_path`, `render_arg`, `render_text`).
    """

    def no_dotdot(name: str, text: str, _before: str) -> None:
        if is_path and has_dotdot(text):
            raise TemplateError(f"field {name!r} = {text!r} would escape the destination folder")

    return _fill(template, values, no_dotdot)


def render_arg(template: str, values: Mapping[str, Any], *, allow_leading_dash: bool = False) -> str:
    """One argv element. Refuses an element whose first character comes from a value and is `-`.

    `-oq` or `--out={name}` written in the config are fine: the dash is the config's. But `{name}`
    for an item named `--help`, or `{prefix}x` with prefix `-rf`, would hand the program an option
    chosen by a producer, so they are refused unless `allow_leading_dash` (exec's `allow_dash_values`).
    """

    def no_option(name: str, text: str, before: str) -> None:
        if text.startswith("-") and not before and not allow_leading_dash:
            raise TemplateError(f"argument {template!r} would start with {_clip(text)!r} from field {name!r}, "
                                "which the program would take as an option; write a prefix in the template "
                                "(for a file, './{name}'), or set allow_dash_values: true on the step")  # fmt: skip

    return _fill(template, values, no_option)


def render_path(template: str, values: Mapping[str, Any], base: Path) -> Path:
    """`base / rendered`, for a relative path template such as `{name}.manifest.json`.

    Each value must be one path component (no `/`): folders are written in the template. The
    result is never absolute, has no empty, `.` or `..` segment (also after percent-decoding), no
    component over 255 bytes, and stays inside `base`.
    """

    def one_component(name: str, text: str, _before: str) -> None:
        if "/" in text:
            raise TemplateError(f"field {name!r} = {_clip(text)!r} holds '/', which would add folders here; "
                                "a value must be one file name (write folders in the template)")  # fmt: skip

    rendered = _fill(template, values, one_component)
    if "\x00" in rendered:
        raise TemplateError(f"template {template!r} holds a NUL byte")
    if rendered.startswith("/"):
        raise TemplateError(f"{_clip(rendered)!r} is absolute where a path relative to the item was asked")
    segments = rendered.split("/")
    if any(s in ("", ".", "..") for s in segments) or has_dotdot(rendered):
        raise TemplateError(f"{_clip(rendered)!r} would escape the item's folder (empty, '.' or '..' segment)")
    for segment in segments:
        if len(os.fsencode(segment)) > MAX_COMPONENT_BYTES:
            raise TemplateError(f"{_clip(segment)!r} is longer than {MAX_COMPONENT_BYTES} bytes")
    target = base / rendered
    if not _is_within(os.path.normpath(target), os.path.normpath(base)):
        raise TemplateError(f"{_clip(rendered)!r} would escape {base}")
    return target


def render_url(template: str, values: Mapping[str, Any], *, glob: bool = False) -> str:
    """Fill a URL template such as `sftp://host/inbox/{session}/{name}`; the result is for `parse_url`.

    The scheme must be written literally. A value in the host part (`sftp://u@{instance_ip}/`) must
    be a host name or address. A value in the path is percent-escaped, so `parse_url` gives back
    exactly the value: `#` and `?` stay in the path, `%2e%2e%2f` stays a literal name, non-UTF-8
    names (surrogate-escaped) stay distinct (and are refused for sftp/s3, which need UTF-8). A
    path value may hold `/` but no `.` or `..` segment after any decoding. With `glob` (a `wait`
    pattern) the value's `*`, `?` and `[` match only themselves.

    After rendering, the path has no `..` after any decoding, no NUL, components of at most 255
    bytes (file, sftp) or a key of at most 1024 bytes (s3), and stays inside the literal base.
    """
    chunks = _chunks(template)
    base = ""  # the literal text before the first field
    for literal, name, _spec in chunks:
        base += literal
        if name is not None:
            break
    scheme_match = _URL_SCHEME.match(base)
    if scheme_match is None:
        raise TemplateError(f"URL template {template!r} must begin with its scheme written out (file://, sftp://, "
                            "s3://), not with a field")  # fmt: skip
    scheme = scheme_match.group(1).lower()
    head = len(scheme_match.group(0))
    out: list[str] = []
    for literal, name, spec in chunks:
        out.append(literal)
        if name is None:
            continue
        text = _no_nul(name, _value(template, name, spec, values))
        # `file://` has no host part; elsewhere the host part ends at the first literal `/` after `://`.
        in_path = scheme == "file" or "/" in "".join(out)[head:]
        out.append(_url_path_value(name, text, scheme, glob) if in_path else _host_value(name, text))
    rendered = "".join(out)
    try:
        parsed = parse_url(rendered)
    except PermanentError as exc:
        raise TemplateError(str(exc)) from None
    folder = _literal_folder(base, scheme, head)
    if folder is not None and not _is_within(parsed.path, folder):
        raise TemplateError(f"{_clip(parsed.path)!r} would escape the destination folder {folder}")
    _check_lengths(parsed.path, scheme)
    return rendered


def _chunks(template: str) -> list[Chunk]:
    try:
        parsed = list(_formatter.parse(template))
    except ValueError as exc:
        raise TemplateError(f"malformed template {template!r}: {exc}") from None
    chunks: list[Chunk] = []
    for literal, name, spec, _conversion in parsed:
        if name is not None and not name.isidentifier():
            raise TemplateError(f"template field {{{name}}} must be a plain name")
        chunks.append((literal, name, spec or ""))
    return chunks


def _value(template: str, name: str, spec: str, values: Mapping[str, Any]) -> str:
    if name not in values or values[name] is None:
        known = ", ".join(sorted(k for k, v in values.items() if v is not None))
        raise TemplateError(f"template {template!r} needs field {name!r}, which this item does not have "
                            f"(it has: {known})")  # fmt: skip
    value = values[name]
    if not spec:
        return str(value)
    try:
        return format(value, spec)
    except (ValueError, TypeError) as exc:
        raise TemplateError(f"field {name!r} = {_clip(str(value))!r} does not fit {{{name}:{spec}}}: {exc}") from None


def _no_nul(name: str, text: str) -> str:
    if "\x00" in text:
        raise TemplateError(f"field {name!r} holds a NUL byte")
    return text


def _host_value(name: str, text: str) -> str:
    if not _HOST_VALUE.match(text):
        raise TemplateError(f"field {name!r} = {_clip(text)!r} is not a host name or address, so it cannot go "
                            "in the host part of a URL")  # fmt: skip
    return text


def _url_path_value(name: str, text: str, scheme: str, glob: bool) -> str:
    decoded = fully_decoded(text)
    if "\x00" in decoded:
        raise TemplateError(f"field {name!r} decodes to a NUL byte")
    segments = re.split(r"[/\\]", decoded)
    if ".." in segments:
        raise TemplateError(f"field {name!r} = {_clip(text)!r} would escape the destination folder "
                            "('..' after decoding)")  # fmt: skip
    if "." in segments:
        raise TemplateError(f"field {name!r} = {_clip(text)!r} holds a '.' path segment")
    if not fits_scheme(scheme, text):
        raise TemplateError(f"field {name!r} = {_clip(text)!r} is not valid UTF-8; {scheme}:// paths must "
                            "be UTF-8 (only file:// takes any bytes)")  # fmt: skip
    if glob:
        text = _GLOB_MAGIC.sub(r"[\1]", text)
    return quote(text, safe="/", errors="surrogateescape")


def _literal_folder(base: str, scheme: str, head: int) -> str | None:
    """The decoded folder the literal text before the first field pins the path to, or None if it pins none."""
    rest = base[head:]
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
    else:
        slash = rest.find("/")
        if slash < 0:
            return None  # a field in the host part, or right after it: only the `..` rules apply
        rest = rest[slash:]
    folder = rest[: rest.rfind("/") + 1]
    return unquote(folder, errors="surrogateescape") if folder else None


def _is_within(path: str, folder: str) -> bool:
    p = posixpath.normpath(re.sub("/+", "/", path))
    f = posixpath.normpath(re.sub("/+", "/", folder))
    if f == ".":
        return not p.startswith("/") and p != ".." and not p.startswith("../")
    if f == "/":
        return p.startswith("/")
    return p == f or p.startswith(f + "/")


def _check_lengths(path: str, scheme: str) -> None:
    encoded = path.encode("utf-8", "surrogateescape")
    if scheme == "s3":
        if len(encoded) > MAX_S3_KEY_BYTES:
            raise TemplateError(f"the S3 key {_clip(path)!r} is longer than {MAX_S3_KEY_BYTES} bytes")
        return
    for segment in encoded.split(b"/"):
        if len(segment) > MAX_COMPONENT_BYTES:
            shown = segment.decode("utf-8", "surrogateescape")
            raise TemplateError(f"{_clip(shown)!r} is longer than {MAX_COMPONENT_BYTES} bytes, the limit for a name")


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
