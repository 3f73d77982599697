"""The one small interface every transport (file, sftp, s3) implements.

`ship`, `wait` and `pull` speak only to this interface; the transports map
their libraries' errors onto `TransientError` / `PermanentError` here, at the
boundary, so the retry policy (`daemon.retries`) never sees paramiko or botocore.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from spoold.errors import PermanentError
from spoold.options import Seconds


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
        return f"{self.scheme}://{self.user}@{self.host}:{self.port or ''}"

    def with_path(self, path: str) -> ParsedUrl:
        return dataclasses.replace(self, path=path)

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{self.scheme}://{user}{self.host}{port}{self.path}"


def parse_url(url: str) -> ParsedUrl:
    """Split `url`; `file://./rel/` keeps its relative path. Raises PermanentError on nonsense."""
    if "://" not in url:
        raise PermanentError(f"not a URL (expected scheme://...): {url!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme == "file":
        rest = url[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest:
            raise PermanentError("file:// URL has no path")
        return ParsedUrl("file", "", None, "", unquote(rest))
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise PermanentError(f"bad port in URL {redact_url(url)!r}") from None
    if not parts.hostname:
        raise PermanentError(f"URL has no host: {redact_url(url)!r}")
    return ParsedUrl(scheme, parts.hostname, port, unquote(parts.username or ""), unquote(parts.path) or "/")


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
    return str(PurePosixPath(folder) / name)


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


@dataclasses.dataclass(frozen=True)
class RemoteEntry:
    """One remote file or folder, as `stat`, `glob` and `walk` report it."""

    path: str
    size: int
    mtime: float
    is_dir: bool


@dataclasses.dataclass
class TransferContext:
    """What a transfer may use: progress, a durable checkpoint, and the stop flag."""

    progress: Callable[[int, int], None]
    checkpoint: dict[str, Any]
    save_checkpoint: Callable[[], None]
    check_stop: Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Delivered:
    """Where a file or folder ended up, and whether its copy was verified."""

    target: str
    size: int
    is_verified: bool


class Transport(ABC):
    """A connection to one destination. Created by `TransportPool`; reused across items."""

    def __init__(self, url: ParsedUrl, settings: Mapping[str, Any]) -> None:
        self.url = url
        self.settings = settings

    def is_usable(self) -> bool:
        """False when the connection died and the pool should open a new one."""
        return True

    def close(self) -> None:  # noqa: B027 - most transports hold nothing to close
        """Release the connection."""

    @abstractmethod
    def put_file(self, source: Path, target: str, sha256: str | None, ctx: TransferContext) -> Delivered:
        """Publish `source` at `target` atomically (temp name then rename, or multipart complete).

        Resumes from `ctx.checkpoint`. When `sha256` is given the copy is verified
        before it becomes visible where the transport allows, else right after.
        """

    @abstractmethod
    def put_tree(self, source: Path, target: str, digests: Mapping[str, str], ctx: TransferContext) -> Delivered:
        """Publish folder `source` as `target` so that it appears complete. `digests`: relpath -> sha256."""

    @abstractmethod
    def write_small(self, target: str, data: bytes) -> None:
        """Write a small file (a ready marker) atomically."""

    def stat(self, target: str) -> RemoteEntry | None:
        """The entry at `target`, or None when it does not exist."""
        raise PermanentError(f"{self.url.scheme}:// cannot stat remote paths")

    def glob(self, pattern: str) -> list[RemoteEntry]:
        """Entries matching a glob pattern (`*`, `?`, `**`)."""
        raise PermanentError(f"{self.url.scheme}:// cannot match remote patterns")

    def read_bytes(self, target: str, limit: int = 1 << 20) -> bytes:
        """The content of a small remote file."""
        raise PermanentError(f"{self.url.scheme}:// cannot read remote files")

    def get_tree(self, source: str, target: Path, ctx: TransferContext) -> list[Path]:
        """Download a remote file or folder into local folder `target`, resumably."""
        raise PermanentError(f"{self.url.scheme}:// cannot download")
