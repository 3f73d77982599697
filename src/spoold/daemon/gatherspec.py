"""The `gather:` option of a queue: which items make one group, and how long a group may take to be whole.

`gather: {by: '{session_id}', expect: {camera_id: [CAM_L, CAM_C, CAM_R]}, timeout: 2h}`: items with the
same rendered `by` belong together; the group is whole once one item for each `expect` value has come.
Kept apart from `config` so that `gather` (which needs `Config`) and `config` (which needs this) do not
import each other. What gathering does is described in `gather`.
"""

from __future__ import annotations

import dataclasses
import os

from spoold.errors import TemplateError
from spoold.options import Seconds
from spoold.templates import template_fields

DEFAULT_TIMEOUT = Seconds(2 * 3600)
# An expected value names a folder inside the group's payload (`CAM_L/recording.mp4`).
_MAX_VALUE_BYTES = 255


@dataclasses.dataclass(frozen=True)
class GatherSpec:
    by: str
    expect: dict[str, list[str]]
    timeout: Seconds = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        try:
            template_fields(self.by)
        except TemplateError as exc:
            raise ValueError(f"gather.by: {exc}") from None
        if not self.by.strip() or "/" in self.by:
            raise ValueError("gather.by must be a template such as '{session_id}' (it names one item: no '/')")
        if len(self.expect) != 1:
            raise ValueError(f"gather.expect names exactly one field and its values, e.g. {{camera_id: [CAM_L, "
                             f"CAM_R]}}; got {len(self.expect)} fields")  # fmt: skip
        field, values = next(iter(self.expect.items()))
        if not values:
            raise ValueError(f"gather.expect.{field} must list at least one value")
        seen: set[str] = set()
        for value in values:
            if value in seen:
                raise ValueError(f"gather.expect.{field} lists {value!r} twice")
            seen.add(value)
            if (not value or "/" in value or "\0" in value or value.startswith(".")
                    or len(os.fsencode(value)) > _MAX_VALUE_BYTES):  # fmt: skip
                raise ValueError(f"gather.expect.{field}: {value!r} cannot name a folder (it must be one file "
                                 "name, not empty, not starting with '.', without '/')")  # fmt: skip
        if self.timeout <= 0:
            raise ValueError("gather.timeout must be longer than 0s")

    @property
    def field(self) -> str:
        """The field whose value tells the members of a group apart (`camera_id`)."""
        return next(iter(self.expect))

    @property
    def values(self) -> list[str]:
        """The expected values, in the config's order (`CAM_L`, `CAM_C`, `CAM_R`)."""
        return self.expect[self.field]
