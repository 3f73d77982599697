"""wait: keep the item in state `waiting` until a condition holds: a remote path, a far sidecar, an HTTP status.

Options: one condition, or `any` (a list of conditions). A condition is exactly one of
- `path`: a URL template, may hold a glob with `*`, `?`, `[..]`, `**`; the newest match becomes
  field `found`, its URL `found_url`. With `settle` (a duration) the match must stay unchanged
  (names, sizes, mtimes and kinds of it and everything below it; SFTP mtimes are whole seconds)
  for that long: it is looked at again `settle` after each change, not after `interval`.
- `sidecar`: URL of another spool's sidecar, with `state` (default `done`) and `import` (fields of
  that sidecar to copy into this item's fields).
- `url`: an http:// or https:// status to GET, with `json` (dotted paths into the reply mapped to
  the value, or list of values, that mean done: all must match), `fail_on` (the same shape; any
  match fails the step at once) and `import` (top-level fields of the reply copied into the item's).

`any: [{url: ..., json: ...}, {path: ..., settle: 30s}]` is done when the first of its conditions
holds; each entry takes its own sub-options and connection options (else the step's), and cannot be
mixed with a condition at the top of the step. The step's result says which one held (`held`: index,
kind, URL) and `waited_s`. Also `interval` (between polls, default 10s), `timeout` (default 24h,
counted from the first poll, across daemon restarts), and the connection options `identity`,
`password_file`, `credential`, `known_hosts`, `host_key`, `connect_timeout` (for a url condition:
the time one GET may take). Paths and sidecars work with `sftp://` and `file://`.

Side effects: none but the item's fields. A far-side `failed` sidecar, a `fail_on` match, a 4xx
other than 404, or the timeout fail the item permanently. A lost connection, a 5xx, a timed-out GET
or a reply that is not a JSON object is logged, shown in the waiting message ("last poll failed:
..."), and polling goes on until the timeout, whose message names the last such problem.

The far side is untrusted: see `spoold.handlers.wait_conditions` and `spoold.http_status`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from spoold.errors import PermanentError, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.wait_conditions import ConditionOptions, Poller, make_poller
from spoold.options import Seconds
from spoold.transports.base import ConnectionOptions


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnyCondition(ConditionOptions):
    """One entry of `any`; a connection option left out is the wait step's own."""

    identity: str | None = None
    password_file: str | None = None
    credential: str | None = None
    known_hosts: str | None = None
    host_key: Literal["strict", "tofu"] | None = None
    connect_timeout: Seconds | None = None

    def __post_init__(self) -> None:
        self.check()

    def connection_settings(self, step: ConnectionOptions) -> dict[str, Any]:
        """This entry's connection options over the step's."""
        settings = step.connection_settings()
        return {key: default if getattr(self, key) is None else getattr(self, key) for key, default in settings.items()}


@dataclasses.dataclass(frozen=True)
class WaitOptions(ConditionOptions, ConnectionOptions):
    any: list[AnyCondition] | None = None
    interval: Seconds = Seconds(10)
    timeout: Seconds = Seconds(86400)

    def __post_init__(self) -> None:
        if self.any is None:
            self.check()
        elif not self.any:
            raise ValueError("any needs at least one condition")
        elif given := self.kinds_given() + self.sub_options_given():
            raise ValueError(f"{', '.join(given)} cannot stand beside any; put each condition in the any list")
        if self.interval <= 0:
            raise ValueError("interval must be more than 0s")
        if self.timeout <= 0:
            raise ValueError("timeout must be more than 0s")

    def conditions(self) -> list[tuple[ConditionOptions, dict[str, Any]]]:
        """Each condition with the connection settings it polls with."""
        if self.any is None:
            return [(self, self.connection_settings())]
        return [(entry, entry.connection_settings(self)) for entry in self.any]


class Wait(Handler[WaitOptions]):
    name = "wait"
    Options = WaitOptions
    url_options = ("path", "sidecar", "any")

    def run(self, ctx: StepContext) -> StepResult:
        pollers = [make_poller(options, settings, ctx) for options, settings in self.options.conditions()]
        # Wall-clock start in the checkpoint: a restarted daemon keeps counting from the first poll.
        started = float(ctx.checkpoint.data.setdefault("started_at", time.time()))
        ctx.checkpoint.save()
        deadline = started + self.options.timeout
        due = [0.0] * len(pollers)  # monotonic time each condition is next looked at
        notes: dict[int, str] = {}
        problems: dict[int, str] = {}
        while True:
            ctx.check_stop()
            for index, poller in enumerate(pollers):
                if due[index] > time.monotonic() and time.time() < deadline:  # at the deadline, one last look
                    continue
                try:
                    poll = poller.poll(ctx)
                except TransientError as exc:
                    # One condition's failing server must not keep the others from being looked at.
                    ctx.log.warning("wait: polling %s failed, will poll again: %s", poller.shown, exc)
                    problems[index] = str(exc)
                    notes.pop(index, None)
                    due[index] = time.monotonic() + self.options.interval
                    continue
                problems.pop(index, None)
                if poll.result is not None:
                    return self._held(poll.result, index, poller, started)
                notes[index] = poll.note
                delay = self.options.interval if poll.recheck_seconds is None else poll.recheck_seconds
                due[index] = time.monotonic() + delay
            what = describe(pollers, notes)
            problem = f" (last poll failed: {'; '.join(problems[i] for i in sorted(problems))})" if problems else ""
            now = time.time()
            if now >= deadline:
                ctx.checkpoint.data.pop("started_at", None)  # `spoold retry` starts a fresh wait
                raise PermanentError(f"timed out after {self.options.timeout:g}s waiting for {what}{problem}")
            delay = max(0.0, min(min(due) - time.monotonic(), deadline - now))
            ctx.waiting(f"{what}{problem}", delay)
            ctx.sleep(delay)

    def _held(self, held: StepResult, index: int, poller: Poller, started: float) -> StepResult:
        held.result["held"] = {"index": index, "kind": poller.kind, "url": poller.shown}
        held.result["waited_s"] = round(time.time() - started, 1)
        return held


def describe(pollers: Sequence[Poller], notes: Mapping[int, str]) -> str:
    """What the step waits for, with what each condition last showed: one line for the sidecar."""
    parts = [poller.describe() + (f" ({notes[i]})" if notes.get(i) else "") for i, poller in enumerate(pollers)]
    return parts[0] if len(parts) == 1 else "any of: " + "; ".join(parts)
