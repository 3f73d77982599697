"""The handler registry: step name -> "module:Class", imported only when a config uses it."""

from __future__ import annotations

import importlib
from typing import Any

from spoold.handlers.base import Handler

HANDLERS: dict[str, str] = {
    "checksum": "spoold.handlers.checksum:Checksum",
    "manifest": "spoold.handlers.manifest:Manifest",
    "forward": "spoold.handlers.forward:Forward",
    "exec": "spoold.handlers.exec:Exec",
    "ship": "spoold.handlers.ship:Ship",
    "fetch": "spoold.handlers.fetch:Fetch",
    "wait": "spoold.handlers.wait:Wait",
    "pull": "spoold.handlers.pull:Pull",
    "encode": "spoold.handlers.encode:Encode",
    "bundle": "spoold.handlers.bundle:Bundle",
    "publish": "spoold.handlers.publish:Publish",
}


def handler_class(name: str) -> type[Handler[Any]]:
    """Return the handler class registered as `name`; KeyError if there is none."""
    module_name, _, attr = HANDLERS[name].partition(":")
    cls: type[Handler[Any]] = getattr(importlib.import_module(module_name), attr)
    return cls
