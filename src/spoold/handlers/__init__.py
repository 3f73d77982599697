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
}


def handler_class(name: str) -> type[Handler[Any]]:
    """Return the handler class registered as `name`; KeyError if there is none."""
    module_name, _, attr = HANDLERS[name].partition(":")
    cls: type[Handler[Any]] = getattr(importlib.import_module(module_name), attr)
    return cls
