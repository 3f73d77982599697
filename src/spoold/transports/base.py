"""The one small interface every transport (file, sftp, s3) implements.

`ship`, `wait` and `pull` speak only to this interface; the transports map
their libraries' errors onto `TransientError` / `PermanentError` here, at the
boundary, so the retry policy (`daemon.retries`) never sees paramiko or botocore.
"""

from __future__ import annotations

import dataclasses
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from spoold.errors import PermanentError
from spoold.options import Seconds
from spoold.transports.documents import SharedDocuments
from spoold.transports.transfer import TransferContext as TransferContext  # noqa: PLC0414 - re-exported

# A file or folder name on Linux and over SFTP.
MAX_NAME_BYTES = 255


@dataclasses.dataclass(frozen=True)
class ParsedUrl:
    """A destination URL split into parts; userinfo passwords are never kept."""

    scheme: str
    host: str
    port: int | None
    user: str
    path: str

    @property
    def is_folder(self) -> bool:
        """A destination ending in `/` is a folder: the item keeps its name there."""
        return self.path.endswith("/")

    def endpoint_key(self) -> str:
        scheme = "sftp" if self.scheme == "ssh" else self.scheme  # one SSH connection serves both
        return f"{scheme}://{self.user}@{self.host}:{self.port or ''}"

    def with_path(self, path: str) -> ParsedUrl:
        return dataclasses.replace(self, path=path)

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{user}{self.host}{port}{self.path}"


# Schemes whose URLs are `scheme://authority/path` with no query or fragment: there `?` and `#` are
# ordinary path characters (an S3 key or a file name may hold them; a `wait` glob uses `?`).
_QUERY_SCHEMES = frozenset({"http", "https"})
# Enough rounds of percent-decoding to see through any realistic nesting (`%25252e` and so on).
_MAX_DECODING_ROUNDS = 16


def fully_decoded(text: str) -> str:
    """`text` percent-decoded again and again until it stops changing (surrogate-escaped, never lossy)."""
    for _ in range(_MAX_DECODING_ROUNDS):
        decoded = unquote(text, errors="surrogateescape")
        if decoded == text:
            return text
        text = decoded
    return text


def has_dotdot(path: str) -> bool:
    """Whether `path` has a `..` segment after every decoding, splitting on either slash."""
    return ".." in re.split(r"[/\\]", fully_decoded(path))


def fits_scheme(scheme: str, text: str) -> bool:
    """Whether `text` can be a path for `scheme`: S3 keys and SFTP paths are UTF-8; `file://` takes any bytes
    (a name that is not UTF-8 arrives as Python's surrogate escapes)."""
    if scheme == "file":
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_decoded_path(path: str, shown: str) -> str:
    """Return `path` (already URL-decoded once) if no decoding of it can climb out or smuggle a NUL.

    Raises PermanentError naming `shown` (a redacted URL) otherwise. This runs on every URL spoold
    parses, so a `%2e%2e%2f` or `%252e%252e%252f` in any destination, source or glob is refused.
    """
    if "\x00" in fully_decoded(path):
        raise PermanentError(f"{shown!r}: the path holds a NUL byte")
    if has_dotdot(path):
        raise PermanentError(f"{shown}: the path holds a '..' segment (after decoding) that would escape "
                             "its folder")  # fmt: skip
    return path


def parse_url(url: str) -> ParsedUrl:
    """Split `url`; `file://./rel/` keeps its relative path. Raises PermanentError on nonsense.

    The path is percent-decoded once (surrogate escapes keep non-UTF-8 bytes distinct), and for
    `file`, `sftp` and `s3` everything after the host is path: `?` and `#` never start a query or a
    fragment. A path with a `..` segment or a NUL after any number of decodings is refused.
    """
    if "://" not in url:
        raise PermanentError(f"not a URL (expected scheme://...): {url!r}")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    shown = redact_url(url)
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest:
            raise PermanentError("file:// URL has no path")
        return ParsedUrl("file", "", None, "", check_decoded_path(unquote(rest, errors="surrogateescape"), shown))
    if scheme in _QUERY_SCHEMES:
        parts = urlsplit(url)
        raw_path = parts.path
    else:
        authority, slash, tail = rest.partition("/")
        if any(c in authority for c in "?#\\"):
            raise PermanentError(f"bad host in URL {shown!r}")
        parts = urlsplit(f"{scheme}://{authority}")
        raw_path = slash + tail
    try:
        port = parts.port
    except ValueError:
        raise PermanentError(f"bad port in URL {shown!r}") from None
    if not parts.hostname:
        raise PermanentError(f"URL has no host: {shown!r}")
    path = check_decoded_path(unquote(raw_path, errors="surrogateescape") or "/", shown)
    return ParsedUrl(scheme, parts.hostname, port, unquote(parts.username or ""), path)


def format_url(url: ParsedUrl) -> str:
    """`url` as text that `parse_url` reads back to the same parts: its path percent-escaped.

    `str(url)` is for people and shows the path as it is; a URL made for a field or a later
    template (such as `wait`'s `found_url`) must come from here, so a `%41`, `#` or `?` in a
    remote name is not decoded or cut off when it is parsed again.
    """
    path = quote(url.path, safe="/", errors="surrogateescape")
    if url.scheme == "file":
        return f"file://{'./' if path.startswith('localhost/') else ''}{path}"
    user = f"{quote(url.user, safe='')}@" if url.user else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{user}{host}{port}{path}"


def redact_url(url: str) -> str:
    """`url` with any userinfo password replaced, for messages."""
    if "://" not in url or "@" not in url.split("://", 1)[1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, _, tail = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in userinfo else ''}@{tail}"


def credential_path(name: str) -> Path:
    """`$CREDENTIALS_DIRECTORY/NAME`: a secret systemd passed in (`LoadCredential=`), never in the YAML."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise PermanentError(f"credential {name!r} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=); "
                             "it is not set")  # fmt: skip
    return Path(folder) / name


def join_remote(folder: str, name: str) -> str:
    """`folder/name` for remote paths; `name` may be a relative path but never climbs out of `folder`."""
    if ".." in name.split("/"):
        raise PermanentError(f"{name!r} holds a '..' segment that would escape {folder}")
    return str(PurePosixPath(folder) / name)


def name_problem(name: str) -> str | None:
    """Why `name` is not one safe path component (the rules for inbox names), or None."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "names a folder itself or its parent"
    if "/" in name:
        return "holds a /"
    if "\x00" in name:
        return "holds a NUL byte"
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        return "is not valid text (a lone surrogate)"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long, more than {MAX_NAME_BYTES}"
    return None


def shown_name(name: str) -> str:
    """`name` quoted for a message, cut short when long (a 300-byte name must not flood a sidecar)."""
    return repr(name) if len(name) <= 160 else repr(name[:60]) + "…"


def check_component(name: str, where: str) -> str:
    """`name` when it is one safe path component; else a PermanentError naming it and `where` it came from."""
    problem = name_problem(name)
    if problem:
        raise PermanentError(f"{where}: the name {shown_name(name)} {problem}; a name must be a single path "
                             "component, so nothing lands outside its folder")  # fmt: skip
    return name


def check_name(name: str, scheme: str = "file") -> str:
    """Return `name` if it is one safe path component for a `scheme://` destination, else PermanentError.

    Not empty, `.` or `..`; no `/`, no NUL; no `..` segment after any percent-decoding (a server
    or a later step that decodes must not find one either); UTF-8 for the remote schemes (S3 keys
    and SFTP paths are UTF-8; a non-UTF-8 name can only go to `file://`).
    """
    if problem := name_problem(name):
        raise PermanentError(f"the name {shown_name(name)} {problem}; it must be a single file name")
    if "\x00" in fully_decoded(name):
        raise PermanentError(f"{name!r} holds a NUL byte")
    if has_dotdot(name):
        raise PermanentError(f"{name!r} decodes to a '..' segment, which would escape its folder")
    if not fits_scheme(scheme, name):
        raise PermanentError(f"{name!r} is not valid UTF-8; {scheme}:// needs UTF-8 names "
                             "(only file:// destinations take any bytes)")  # fmt: skip
    return name


def join_name(folder: str, name: str, scheme: str = "file") -> str:
    """`folder/name` where `name` (an item's or a file's name) must stay one component: see `check_name`."""
    return str(PurePosixPath(folder) / check_name(name, scheme))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectionOptions:
    """How a step reaches a remote host; shared by the options of ship, wait and pull."""

    identity: str | None = None
    password_file: str | None = None
    credential: str | None = None
    known_hosts: str | None = None
    host_key: Literal["strict", "tofu"] = "strict"
    connect_timeout: Seconds = Seconds(30)

    def connection_settings(self) -> dict[str, Any]:
        """These options as the plain mapping `TransportPool.get` takes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ConnectionOptions)}


# The settings that decide an SSH connection (the pool shares one connection among steps that agree on them).
CONNECTION_KEYS = tuple(f.name for f in dataclasses.fields(ConnectionOptions))


@dataclasses.dataclass(frozen=True)
class RemoteEntry:
    """One remote file or folder, as `stat`, `glob` and `walk` report it."""

    path: str
    size: int
    mtime: float
    is_dir: bool


@dataclasses.dataclass(frozen=True)
class TreeLimits:
    """How deep (path components below the root) and how big (files and folders) a pulled tree may be."""

    depth: int = 32
    files: int = 100_000

    def __post_init__(self) -> None:
        if self.depth < 1 or self.files < 1:
            raise ValueError("limits.depth and limits.files must be at least 1")

    def check(self, relative: str, count: int, root: str, consequence: str = "nothing was pulled") -> None:
        """Refuse entry number `count` at `relative` (below `root`) when it passes a limit."""
        if relative.count("/") + 1 > self.depth:
            raise PermanentError(f"{root}: {shown_name(relative)} is nested more than {self.depth} levels deep "
                                 f"(limits.depth); {consequence}")  # fmt: skip
        if count > self.files:
            raise PermanentError(f"{root} holds more than {self.files} files and folders (limits.files); "
                                 f"{consequence}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """How a command run on the far host ended: its exit status and the tails of its output."""

    status: int
    stdout: str
    stderr: str


@dataclasses.dataclass(frozen=True)
class Delivered:
    """Where a file or folder ended up, and whether its copy was verified."""

    target: str
    size: int
    is_verified: bool


class Transport(SharedDocuments, ABC):
    """A connection to one destination. Created by `TransportPool`; reused across items (shared documents: its base)."""

    def __init__(self, url: ParsedUrl, settings: Mapping[str, Any]) -> None:
        self.url = url
        self.settings = settings

    @classmethod
    def connection_key(cls, settings: Mapping[str, Any]) -> str:
        """What of `settings` decides the connection: steps that agree on it share one (the pool's key)."""
        return repr(sorted(settings.items()))

    def is_usable(self) -> bool:
        """False when the connection died and the pool should open a new one."""
        return True

    def close(self) -> None:  # most transports hold nothing to close
        """Release the connection."""

    @abstractmethod
    def put_file(self, source: Path, target: str, digests: Mapping[str, str], ctx: TransferContext) -> Delivered:
        """Publish `source` at `target` atomically (temp name then rename, or multipart complete).

        Resumes from `ctx.checkpoint`. `digests` are the source's known digests by algorithm (the checksum
        step's: `sha256`, `xxh3_128`, ...), empty when none is known. The copy is verified before it becomes
        visible where the transport allows, else right after; a source that no longer matches a known digest
        is a PermanentError.
        """

    @abstractmethod
    def put_tree(self, source: Path, target: str, digests: Mapping[str, Mapping[str, str]],
                 ctx: TransferContext) -> Delivered:  # fmt: skip
        """Publish folder `source` as `target` so that it appears complete. `digests`: relpath -> known digests
        by algorithm, as for `put_file`."""

    @abstractmethod
    def write_small(self, target: str, data: bytes) -> None:
        """Write a small file (a ready marker) atomically."""

    def stat(self, target: str) -> RemoteEntry | None:
        """The entry at `target`, or None when it does not exist."""
        raise PermanentError(f"{self.url.scheme}:// cannot stat remote paths")

    def glob(self, pattern: str) -> list[RemoteEntry]:
        """Entries matching a glob pattern (`*`, `?`, `**`)."""
        raise PermanentError(f"{self.url.scheme}:// cannot match remote patterns")

    def tree(self, target: str) -> list[RemoteEntry]:
        """`target`'s entry and all below it, sorted by path ([] if missing); symlinks never followed; bounded
        by `TreeLimits` (`TreeLimits.check`), so a far side cannot make a settling `wait` list forever."""
        raise PermanentError(f"{self.url.scheme}:// cannot list remote trees")

    def run_command(self, command: str, *, timeout: float, check_stop: Callable[[], None]) -> CommandResult:
        """Run a shell command line on the far host (its words already quoted); CommandTimedOut past `timeout`."""
        raise PermanentError(f"{self.url.scheme}:// cannot run commands on the far host")

    def read_bytes(self, target: str, limit: int = 1 << 20) -> bytes:
        """The content of a small remote file."""
        raise PermanentError(f"{self.url.scheme}:// cannot read remote files")

    def get_tree(
        self, source: str, target: Path, ctx: TransferContext, *, name: str | None = None,
        limits: TreeLimits | None = None,
    ) -> list[Path]:  # fmt: skip
        """Download a remote file or folder into local folder `target` as `name` (default: its own name).

        Published atomically under a temp name beside it; an earlier copy is replaced whole, but a file
        never replaces a folder nor a folder a file. `limits` bound a pulled tree (default `TreeLimits()`);
        they are per call, never transport settings, since one connection serves every step that shares it.
        """
        raise PermanentError(f"{self.url.scheme}:// cannot download")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over object keys as a regex: `**` crosses `/`; `*` and `?` stay within one path segment."""

    def segment(chunk: str) -> str:
        return "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in chunk)

    return re.compile(".*".join(segment(chunk) for chunk in pattern.split("**")))
