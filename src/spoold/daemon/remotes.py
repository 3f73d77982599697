"""Named remotes (`remotes:` at the top of the config): connection settings written once, like ~/.ssh/config.

`remotes: {edge: {url: 'sftp://dorobot@edge.lan:22', identity: ..., known_hosts: ...}}` lets a step
write `sftp://edge/var/spool/...`. Before a step's options are built, each of its URL options
(`Handler.url_options`) whose host is a remote's name, with no user or port of its own, gets the
remote's authority (`sftp://dorobot@edge.lan:22/var/spool/...`), and the remote's settings are
added wherever the step does not set them itself: the step overrides the remote. `ssh://` and
`sftp://` may use each other's remotes (one SSH login); `s3://` only an `s3://bucket` remote.
A host that is no remote's name, or a templated one (`{host}`), is an ordinary host name.

Handlers never see a remote, only ordinary URLs and options, so nothing under `handlers/` depends
on this module.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from spoold.errors import PermanentError
from spoold.handlers.base import Handler
from spoold.options import Builder, YamlPath
from spoold.transports.base import ConnectionOptions, parse_url, redact_url

REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Scheme -> the kind of connection it makes: `ssh://` (exec) and `sftp://` (ship, wait, pull) are one SSH login.
_CONNECTION_KIND = {"sftp": "ssh", "ssh": "ssh", "s3": "s3"}
# Settings that only mean something for one kind: a remote that sets the other kind's is a mistake.
_ONLY_FOR = {"ssh": ("endpoint_url", "region"), "s3": ("identity", "password_file", "known_hosts", "host_key")}
# An option of this name holds a remote's bare name as well as a URL (`exec: {remote: gpu}`).
_BARE_NAME_OPTIONS = frozenset({"remote"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RemoteSpec(ConnectionOptions):
    """One entry of `remotes:`: where to connect (`url`: a host or a bucket, no path) and how."""

    url: str
    endpoint_url: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        kind = _CONNECTION_KIND[self.scheme]
        wrong = [name for name in _ONLY_FOR[kind] if name in self.settings()]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not used by {self.scheme}:// remotes")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url: {redact_url(self.endpoint_url)!r} must be an http:// or https:// URL")

    @property
    def scheme(self) -> str:
        return _split_remote_url(self.url)[0]

    @property
    def authority(self) -> str:
        """`user@host:port` (or the bucket) exactly as the url writes it."""
        return _split_remote_url(self.url)[1]

    @property
    def kind(self) -> str:
        """`ssh` or `s3`: which step URLs may use this remote."""
        return _CONNECTION_KIND[self.scheme]

    def settings(self) -> dict[str, Any]:
        """The connection options this remote sets, i.e. those that differ from their defaults."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "url" and getattr(self, field.name) != field.default
        }


def _split_remote_url(url: str) -> tuple[str, str]:
    """(scheme, authority) of a remote's url; ValueError when it is not `scheme://authority` with no path."""
    usage = "must be sftp://[user@]host[:port], ssh://[user@]host[:port] or s3://bucket"
    if "{" in url:
        raise ValueError("url: a remote's url cannot hold a template")
    if "://" not in url:
        raise ValueError(f"url: {redact_url(url)!r} {usage}")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _CONNECTION_KIND:
        raise ValueError(f"url: {redact_url(url)!r} {usage}")
    authority, _, path = rest.partition("/")
    if ":" in authority.rpartition("@")[0]:
        raise ValueError("url: never put a password in a remote's url; use password_file or credential")
    if path:
        raise ValueError(f"url: {redact_url(url)!r} names a host only; put the path in each step's URL")
    try:
        parsed = parse_url(url)  # the same host and port rules as every step URL
    except PermanentError as exc:
        raise ValueError(f"url: {exc}") from None
    if scheme == "s3" and (parsed.user or parsed.port is not None):
        raise ValueError(f"url: {redact_url(url)!r}: an s3:// remote names a bucket only; use endpoint_url "
                         "for another server")  # fmt: skip
    return scheme, authority


def check_remote_names(builder: Builder, remotes: Mapping[str, RemoteSpec]) -> None:
    """Refuse a remote name that could not be a URL's whole host."""
    for name in remotes:
        if not REMOTE_NAME.match(name):
            raise builder.error(("remotes", name), f"remote name {name!r} must be letters, digits, '_', '.' or '-'")


def resolve_step_options(
    builder: Builder, remotes: Mapping[str, RemoteSpec], handler: type[Handler[Any]], options: object, path: YamlPath
) -> object:
    """The raw options of one step with every URL that names a remote rewritten, and its settings added."""
    if not handler.url_options or not isinstance(options, Mapping):
        return options
    resolver = _Resolver(builder, remotes, handler.name, handler.url_options)
    return resolver.mapping(options, handler.Options, path)


@dataclasses.dataclass(frozen=True)
class _Resolver:
    builder: Builder
    remotes: Mapping[str, RemoteSpec]
    handler_name: str
    keys: tuple[str, ...]

    def mapping(self, raw: Mapping[Any, Any], options_type: object, path: YamlPath) -> dict[Any, Any]:
        """`raw` resolved; a list of mappings under a URL key (wait's `any`) is resolved entry by entry."""
        resolved = dict(raw)
        accepted = _accepted_keys(options_type)
        added: dict[str, str] = {}  # setting -> the remote it came from
        for key in self.keys:
            value = raw.get(key)
            where: YamlPath = (*path, key)
            if isinstance(value, list):
                entry_type = _entry_type(options_type, key)
                resolved[key] = [
                    self.mapping(entry, entry_type, (*where, i)) if isinstance(entry, Mapping) else entry
                    for i, entry in enumerate(value)
                ]
                continue
            if not isinstance(value, str) or (found := self.lookup(key, value, where)) is None:
                continue
            name, resolved[key] = found
            for setting, setting_value in self.remotes[name].settings().items():
                if setting in raw:
                    continue
                if setting in added and resolved[setting] != setting_value:
                    raise self.builder.error(where, f"remotes {added[setting]!r} and {name!r} set different "
                                             f"{setting}; set it on the step")  # fmt: skip
                if accepted is not None and setting not in accepted:
                    raise self.builder.error(where, f"remote {name!r} sets {setting}, which {self.handler_name} "
                                             "does not take here")  # fmt: skip
                added[setting] = name
                resolved[setting] = setting_value
        return resolved

    def lookup(self, key: str, value: str, where: YamlPath) -> tuple[str, str] | None:
        """(remote name, rewritten URL) when `value` names a remote, else None."""
        if "://" not in value:
            if key not in _BARE_NAME_OPTIONS or "{" in value:
                return None
            remote = self.remotes.get(value)
            if remote is None:
                known = f"; remotes: {', '.join(sorted(self.remotes))}" if self.remotes else " (no remotes: section)"
                raise self.builder.error(where, f"no remote named {value!r}{known}")
            if remote.kind != "ssh":
                raise self.builder.error(where, f"remote {value!r} is an {remote.scheme}:// remote; {key} needs "
                                         "an SSH host")  # fmt: skip
            return value, f"ssh://{remote.authority}"
        scheme, rest = value.split("://", 1)
        kind = _CONNECTION_KIND.get(scheme.lower())
        # Remote names hold no `@`, `:` or `{`, so a URL with its own user or port, or a templated host, never
        # matches one here: it is an ordinary host name. http(s):// and file:// URLs are never remotes.
        authority, slash, tail = rest.partition("/")
        remote = self.remotes.get(authority) if kind is not None else None
        if remote is None:
            return None
        if remote.kind != kind:
            mix = f"{scheme}:// and {remote.scheme}:// do not mix"
            raise self.builder.error(where, f"{redact_url(value)!r} cannot use remote {authority!r}, which is "
                                     f"{redact_url(remote.url)!r}: {mix}")  # fmt: skip
        # The path is kept exactly as written: templates and percent-escapes are the handler's to read.
        return authority, f"{scheme}://{remote.authority}{slash}{tail}"


def _accepted_keys(options_type: object) -> frozenset[str] | None:
    """The YAML keys a dataclass of options takes, or None when its shape is not known here."""
    if not (dataclasses.is_dataclass(options_type) and isinstance(options_type, type)):
        return None
    return frozenset(f.metadata.get("key", f.name) for f in dataclasses.fields(options_type) if f.init)


def _entry_type(options_type: object, key: str) -> object:
    """The element type of the list option `key` (`any: list[Condition]`), or None when not known."""
    if not (dataclasses.is_dataclass(options_type) and isinstance(options_type, type)):
        return None
    field = next((f for f in dataclasses.fields(options_type) if f.metadata.get("key", f.name) == key), None)
    if field is None:
        return None
    hint = typing.get_type_hints(options_type).get(field.name)
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), None)
    if typing.get_origin(hint) is not list:
        return None
    return typing.get_args(hint)[0]
