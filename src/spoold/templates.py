"""`{field}` templates for destinations and argv."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from spoold.errors import TemplateError

_formatter = string.Formatter()


def template_fields(template: str) -> list[str]:
    """The field names a template uses; raises TemplateError on malformed braces."""
    try:
        return [name for _, name, _, _ in _formatter.parse(template) if name is not None]
    except ValueError as exc:
        raise TemplateError(f"malformed template {template!r}: {exc}") from None


def render(template: str, values: Mapping[str, Any], *, is_path: bool = True) -> str:
    """Fill `template` from `values`.

    Only plain names are allowed (no `{a.b}` or `{a[0]}`), so a template cannot
    reach into objects. For paths, a value holding a `..` segment is refused:
    a field from a file name must never move a destination outside its base.
    """
    out = []
    try:
        parsed = list(_formatter.parse(template))
    except ValueError as exc:
        raise TemplateError(f"malformed template {template!r}: {exc}") from None
    for literal, name, spec, conversion in parsed:
        out.append(literal)
        if name is None:
            continue
        if not name.isidentifier():
            raise TemplateError(f"template field {{{name}}} must be a plain name")
        if name not in values or values[name] is None:
            known = ", ".join(sorted(k for k, v in values.items() if v is not None))
            raise TemplateError(f"template {template!r} needs field {name!r}, which this item does not have "
                                f"(it has: {known})")
        value = values[name]
        text = format(value, spec or "") if spec else str(value)
        if is_path and ".." in text.replace("\\", "/").split("/"):
            raise TemplateError(f"field {name!r} = {text!r} would escape the destination folder")
        del conversion
        out.append(text)
    return "".join(out)
