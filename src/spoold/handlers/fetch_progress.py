"""The progress of a whole `fetch` request, as the sidecar shows it.

`bytes_done` and `bytes_total` count every file of the request; `files_done`,
`files_total` and `file` (the name of the file being fetched, one path
component) say where in the request the step is. A size comes from the request
or, when the request does not give it, from what the server announced for that
file (kept in the file's checkpoint state as `size`); `bytes_total` is null
until every file's size is known, rather than a number that would make the
percentage and the ETA lie (field note 001: `100.0% ... eta 0s` from the first
byte to the last).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spoold.handlers.base import StepContext
from spoold.handlers.fetch_http import FileSpec

# A file in one of these states has all its bytes counted in its state's `bytes`.
_SETTLED = frozenset({"downloaded", "handed_over", "missing", "mismatch"})


class RequestProgress:
    """Reports `ctx.progress` for the request `files`, whose per-file checkpoint states are `states`."""

    def __init__(self, ctx: StepContext, files: list[FileSpec], states: dict[str, dict[str, Any]]) -> None:
        self.ctx = ctx
        self.files = files
        self.states = states

    def reporter(self, spec: FileSpec, state: dict[str, Any]) -> Callable[[int, int | None], None]:
        """`report(done, size)` for one file: its bytes so far, and its size when a server just announced it."""

        def report(done: int, size: int | None = None) -> None:
            state["bytes"] = done
            if size is not None and spec.size is None:
                state["size"] = size
            self.report(spec)

        return report

    def handed_over(self, spec: FileSpec) -> None:
        """After `spec` went to its queue: the next file's first report moves the sidecar on; the last one ends it."""
        if spec is self.files[-1]:
            self.report(spec)

    def report(self, current: FileSpec) -> None:
        finished = sum(1 for s in self.states.values() if s.get("state") == "handed_over")
        so_far = sum(int(s.get("bytes") or 0) for s in self.states.values())
        self.ctx.progress(so_far, self.total(), files_done=finished, files_total=len(self.files), file=current.name)

    def total(self) -> int | None:
        """The bytes of the whole request, or None while any file's size is still unknown."""
        total = 0
        for spec in self.files:
            state = self.states.get(spec.name, {})
            if spec.size is not None:
                total += spec.size
            elif state.get("state") in _SETTLED:
                total += int(state.get("bytes") or 0)
            elif isinstance(state.get("size"), int):
                total += state["size"]
            else:
                return None
        return total
