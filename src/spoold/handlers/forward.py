"""forward: hand the payload (and the files beside it) to another local queue, with the item's fields.

Options: `to` (queue name; `- forward: outgoing` is short for `{to: outgoing}`).
Side effects: a new item in the target queue's work/, made by hard links (a copy
across filesystems), exactly once even across crashes.
"""

from __future__ import annotations

import dataclasses

from spoold.errors import PermanentError
from spoold.handlers.base import Handler, StepContext, StepResult


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    to: str


class Forward(Handler[ForwardOptions]):
    name = "forward"
    Options = ForwardOptions
    shorthand = "to"

    def validate(self, queue_names: frozenset[str], is_queue_of_requests: bool) -> str | None:
        if self.options.to not in queue_names:
            return f"forward to {self.options.to!r}: no such queue; queues: {', '.join(sorted(queue_names))}"
        return None

    def run(self, ctx: StepContext) -> StepResult:
        paths = ctx.payload + ctx.extras
        if not paths:
            raise PermanentError("nothing to forward: the item has no payload")
        new_name = ctx.hand_over(self.options.to, paths, ctx.fields)
        ctx.log.info("forwarded to %s/%s", self.options.to, new_name)
        return StepResult(result={"queue": self.options.to, "item": new_name})
