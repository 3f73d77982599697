"""The transport registry: URL scheme -> "module:Class", imported only when a destination uses it.

A node that never ships to S3 never imports boto3; a missing optional package
is reported with the extra that provides it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import Any

from spoold.errors import MissingDependency, PermanentError
from spoold.transports.base import Transport, parse_url

TRANSPORTS: dict[str, tuple[str, str]] = {
    # scheme: ("module:Class", pip extra that provides its library)
    "file": ("spoold.transports.local:LocalTransport", ""),
    "sftp": ("spoold.transports.sftp:SftpTransport", "sftp"),
    # A remote `exec` (`ssh://`) rides the same SSH connection as the host's sftp:// steps.
    "ssh": ("spoold.transports.sftp:SftpTransport", "sftp"),
    "s3": ("spoold.transports.s3:S3Transport", "s3"),
}


def transport_class(scheme: str) -> type[Transport]:
    """Return the transport class for `scheme`, with a clear error when it is unknown or not installed."""
    if scheme not in TRANSPORTS:
        raise PermanentError(f"unsupported URL scheme {scheme!r}; expected one of {', '.join(sorted(TRANSPORTS))}")
    target, extra = TRANSPORTS[scheme]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = f"; install it with: pip install 'spoold[{extra}]'" if extra else ""
        raise MissingDependency(f"{scheme}:// needs the Python package {exc.name!r}{hint}") from None
    cls: type[Transport] = getattr(module, attr)
    return cls


class TransportPool:
    """Connected transports shared across items, one per destination and settings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], Transport] = {}

    def get(self, url: str, settings: Mapping[str, Any]) -> Transport:
        parsed = parse_url(url)
        cls = transport_class(parsed.scheme)
        key = (parsed.endpoint_key(), cls.connection_key(settings))
        with self._lock:
            transport = self._open.get(key)
            if transport is None or not transport.is_usable():
                if transport is not None:
                    transport.close()
                transport = cls(parsed, settings)
                self._open[key] = transport
            return transport

    def close(self) -> None:
        with self._lock:
            transports, self._open = list(self._open.values()), {}
        for transport in transports:
            transport.close()
